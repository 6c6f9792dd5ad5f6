"""/broker/authenticate and /broker/authorize: the controller as the authentication and
authorization service of a broker cluster.

EMQX 5's HTTP authenticator and HTTP authorizer call them (a HiveMQ extension can call the
same routes): a POST at each client login with ``username``, ``password`` and ``clientid``,
and at each publish or subscribe with ``username``, ``clientid``, ``topic`` and ``action``
(``publish`` or ``subscribe``). The answer is HTTP 200 with ``{"result": "allow" | "deny"}``,
decided by :mod:`controller.broker_access` from the fleet's password hashes and the rules of
deploy/mosquitto/edgefleet.acl.

The broker calls these routes, not an operator: they sit outside /v1, take no operator token
(their minimum role is public to the application-wide check) and answer only a caller that
sends the broker secret whose SHA-256 is ``broker_auth_secret_sha256`` in controller.toml.
A missing or wrong secret is 401, and so is any call while none is set. EMQX takes any
status but 200/204 as "ignore" and asks the next source of its chain, so the broker's chain
must end in a refusal (docs/scaling.md shows the configuration).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Security, status
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from controller import broker_access
from controller.api.deps import PUBLIC, ControllerDep, minimum_role
from controller.api.responses import ErrorPublic
from controller.auth import token_matches
from controller.log_bounds import BadMessageLog

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Broker-Secret"
# MQTT strings are at most 65535 bytes; a username or client id longer than this is no account of ours.
MAX_NAME_CHARS = 256
MAX_PASSWORD_CHARS = 1024
MAX_TOPIC_CHARS = 65535

_secret = APIKeyHeader(
    name=SECRET_HEADER,
    auto_error=False,
    description="The broker secret whose SHA-256 is broker_auth_secret_sha256 in controller.toml",
)
# A broker asks at every login and publish: one line per refused account and second at most.
_refusals = BadMessageLog(log, per_s=1.0)


def broker_secret(controller: ControllerDep, secret: Annotated[str | None, Security(_secret)]) -> None:
    expected = controller.settings.broker_auth_secret_sha256
    if not expected:
        # No secret can be right; 401 like a wrong one (a 5xx would say the controller is broken).
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "broker authentication is not configured: set broker_auth_secret_sha256 in controller.toml",
        )
    if secret is None or not token_matches(secret, expected):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"missing or wrong {SECRET_HEADER} header")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description}


router = APIRouter(
    prefix="/broker",
    tags=["broker"],
    dependencies=[Security(broker_secret)],
    responses={401: _error(f"Missing or wrong {SECRET_HEADER} header, or no broker secret configured")},
)


class AuthenticateRequest(BaseModel):
    """What EMQX's HTTP authenticator sends at a login (its body template names these fields)."""

    username: str = Field(max_length=MAX_NAME_CHARS)
    password: str = Field(max_length=MAX_PASSWORD_CHARS)
    clientid: str = Field(max_length=MAX_NAME_CHARS)


class AuthorizeRequest(BaseModel):
    """What EMQX's HTTP authorizer sends at a publish or subscribe."""

    username: str = Field(max_length=MAX_NAME_CHARS)
    clientid: str = Field(max_length=MAX_NAME_CHARS)
    topic: str = Field(
        max_length=MAX_TOPIC_CHARS, description="the topic published to, or the filter subscribed"
    )
    action: str = Field(max_length=32, description="publish or subscribe; anything else is refused")


class BrokerDecisionPublic(BaseModel):
    result: Literal["allow", "deny"]
    # No EdgeFleet account is a superuser: every publish and subscribe goes through /broker/authorize.
    is_superuser: bool = False


def _answer(
    decision: broker_access.Decision, what: str, username: str, **fields: str
) -> BrokerDecisionPublic:
    if decision.allowed:
        log.debug("broker %s allowed user=%s reason=%s %s", what, username, decision.reason, fields)
    else:
        details = " ".join(f"{k}=%s" for k in fields)
        _refusals.log(
            logging.INFO,
            username,
            f"broker {what} refused user=%s {details} reason=%s",
            username,
            *fields.values(),
            decision.reason,
        )
    return BrokerDecisionPublic(result="allow" if decision.allowed else "deny")


@router.post("/authenticate", openapi_extra=minimum_role(PUBLIC))
def authenticate(body: AuthenticateRequest, controller: ControllerDep) -> BrokerDecisionPublic:
    """May this client log in: the password against the fleet's hash, the client id equal to the username."""
    settings = controller.settings
    decision = broker_access.authenticate(
        body.username,
        body.clientid,
        body.password,
        settings.mqtt_username,
        settings.mqtt_password_hash,
        controller.fleet.password_hash,
    )
    return _answer(decision, "login", body.username, clientid=body.clientid)


@router.post("/authorize", openapi_extra=minimum_role(PUBLIC))
def authorize(body: AuthorizeRequest, controller: ControllerDep) -> BrokerDecisionPublic:
    """May this client publish to, or subscribe to, this topic: the rules of the Mosquitto ACL."""
    decision = broker_access.authorize(
        body.username,
        body.clientid,
        body.topic,
        body.action,
        controller.settings.mqtt_username,
        controller.fleet.is_known,
    )
    return _answer(
        decision, "access", body.username, clientid=body.clientid, action=body.action, topic=body.topic
    )
