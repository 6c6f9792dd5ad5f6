"""/v1/tokens (operator accounts, admin only) and /v1/audit (who changed what)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field

from controller.api.bodies import Create, Public
from controller.api.deps import ControllerDep, PrincipalDep, minimum_role
from controller.audit import DEFAULT_LIMIT, MAX_LIMIT
from controller.auth import TOKEN_NAME_PATTERN, Role

router = APIRouter(tags=["accounts"])


class TokenCreate(Create):
    name: str = Field(pattern=TOKEN_NAME_PATTERN, description="who or what holds the token")
    role: Literal["viewer", "operator", "admin", "metrics"] = "viewer"
    expires_in_s: float | None = Field(None, gt=0, description="lifetime in seconds; none = until revoked")


class TokenPublic(Public):
    id: str
    name: str
    role: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class TokenCreatedPublic(TokenPublic):
    token: str = Field(description="the bearer token, shown once")


class AuditEntryPublic(Public):
    id: int
    at: float
    actor_id: str
    actor: str
    role: str
    via: str = Field(description="bearer (API, CLI) or console")
    method: str
    route: str
    target: dict[str, str]
    status: int


class WhoAmIPublic(BaseModel):
    id: str
    name: str
    role: str
    via: str


@router.post(
    "/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreatedPublic,
    openapi_extra=minimum_role(Role.ADMIN),
)
def create_token(body: TokenCreate, controller: ControllerDep) -> TokenCreatedPublic:
    """A new operator token with a role; the token itself is in the answer only."""
    info, secret = controller.accounts.create(body.name, body.role, body.expires_in_s)
    return TokenCreatedPublic(**TokenPublic.model_validate(info).model_dump(), token=secret)


@router.get("/tokens", response_model=list[TokenPublic], openapi_extra=minimum_role(Role.ADMIN))
def list_tokens(controller: ControllerDep) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in controller.accounts.tokens()]


@router.delete("/tokens/{token_id}", response_model=TokenPublic, openapi_extra=minimum_role(Role.ADMIN))
def revoke_token(token_id: str, controller: ControllerDep) -> TokenPublic:
    """Revoke a token: its requests are refused and its console sessions end at once."""
    return TokenPublic.model_validate(controller.accounts.revoke(token_id))


@router.get("/whoami", response_model=WhoAmIPublic)
def whoami(principal: PrincipalDep) -> WhoAmIPublic:
    assert principal is not None
    return WhoAmIPublic(id=principal.id, name=principal.name, role=principal.role.value, via=principal.via)


@router.get("/audit", response_model=list[AuditEntryPublic], openapi_extra=minimum_role(Role.OPERATOR))
def audit_log(
    controller: ControllerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    actor: str | None = None,
    before_id: int | None = None,
) -> list[AuditEntryPublic]:
    """Every state-changing request, newest first: who (token), what (method, route, target), when, result."""
    return [AuditEntryPublic.model_validate(e) for e in controller.audit.entries(limit, actor, before_id)]
