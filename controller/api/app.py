"""The FastAPI application: routers under /v1 and the console under /ui, every route behind
the one role check (:func:`controller.api.deps.authorize`), every state-changing request in
the audit log, domain errors mapped to HTTP statuses, and the MQTT transport run by the lifespan."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller import console
from controller.api import (
    accounts,
    broker_auth,
    devices,
    export,
    groups,
    loop,
    models,
    profiles,
    rollouts,
    signing,
    status,
    telemetry,
)
from controller.api.deps import authorize
from controller.api.docs import install_docs
from controller.api.responses import allowed_methods, install_openapi, validation_error_body
from controller.api.upload_limits import BodyMeter, limits_for
from controller.audit import AuditMiddleware
from controller.auth import parse_bearer
from controller.errors import (
    BrokerAuthError,
    ConflictError,
    ControllerError,
    DatabaseUnavailable,
    InvalidInputError,
    NotFoundError,
    TooLargeError,
)
from controller.roles import ALL as ALL_ROLES
from controller.roles import Role
from controller.service import Controller
from controller.settings import Settings

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[ControllerError], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (TooLargeError, 413),
    (InvalidInputError, 422),
    (BrokerAuthError, 503),
    # Worth retrying: the database comes back (a restart, a failover), nothing was changed.
    (DatabaseUnavailable, 503),
]


def status_for(exc: ControllerError) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


class BodyLimitGuard:
    """Holds every request body to its route's limits (:mod:`controller.api.upload_limits`)
    as it arrives. Uploads are refused before their body is read: 401 without the token,
    413 when the declared Content-Length is already over the limit."""

    def __init__(self, app: ASGIApp, controller: Controller) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = None
        if scope["type"] == "http":
            limits = limits_for(scope["method"], scope["path"], self.controller.settings.max_upload_bytes)
        if limits is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if limits.parts and scope["path"].startswith("/v1/"):
            # Only a pre-check, so an unknown caller cannot make us read a large body; the
            # route's role is checked by the application's dependency as for any route.
            token = parse_bearer(headers.get("authorization", ""))
            try:
                known = token is not None and self.controller.accounts.resolve(token) is not None
            except DatabaseUnavailable as exc:
                await _reply(send, 503, str(exc), {"retry-after": "5"})
                return
            if not known:
                await _reply(send, 401, "missing or invalid bearer token", {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.total:
            await _reply(send, 413, limits.describe_total(int(length)), {})
            return
        meter = BodyMeter(limits, headers.get("content-type", ""))

        async def metered() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                meter.feed(message.get("body", b""))
            return message

        await self.app(scope, metered, send)


async def _reply(send: Send, status: int, detail: str, extra: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: Settings,
    *,
    start_transport: bool = True,
    roles: frozenset[Role] = ALL_ROLES,
    instance: int | None = None,
) -> FastAPI:
    controller = Controller(settings, roles, instance)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_transport:
            controller.start_transport()
        try:
            yield
        finally:
            controller.close()

    app = FastAPI(
        title="EdgeFleet controller",
        version="0.1.0",
        lifespan=lifespan,
        # /docs is served from packaged assets (install_docs); ReDoc would need a CDN.
        docs_url=None,
        redoc_url=None,
        description=(
            "Model registry, fleet, rollouts and telemetry. Every /v1 route needs a bearer token whose role"
            " (viewer < operator < admin) is at least the route's `x-minimum-role`."
        ),
        dependencies=[Depends(authorize)],
    )
    app.state.controller = controller

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; a path has
            # one route per method here.
            headers["Allow"] = ", ".join(allowed_methods(app.openapi(), request.url.path))
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_error_body(exc))

    @app.exception_handler(ControllerError)
    async def controller_error(request: Request, exc: ControllerError) -> JSONResponse:
        code = status_for(exc)
        level = logging.ERROR if code >= 500 else logging.INFO
        log.log(
            level,
            "request refused status=%d method=%s path=%s reason=%s",
            code,
            request.method,
            request.url.path,
            exc,
        )
        headers = {"Retry-After": "5"} if isinstance(exc, DatabaseUnavailable) else None
        return JSONResponse(status_code=code, content={"detail": str(exc)}, headers=headers)

    for module in (models, devices, profiles, rollouts, groups, telemetry, export, signing, accounts, status):
        app.include_router(module.router, prefix="/v1")
    app.include_router(loop.router)
    app.include_router(broker_auth.router)
    console.mount(app)
    app.add_middleware(BodyLimitGuard, controller=controller)
    app.add_middleware(AuditMiddleware, audit=controller.audit)
    install_openapi(app)
    install_docs(app)
    return app
