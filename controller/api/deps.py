"""FastAPI dependencies, as ``Annotated`` aliases the routers import."""

from __future__ import annotations

import hmac
from typing import Annotated, Final, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.security import APIKeyCookie
from fastapi.security.base import SecurityBase

from controller.audit import PRINCIPAL_KEY, ROUTE_KEY, SAFE_METHODS
from controller.auth import Principal, Role, parse_bearer
from controller.closed_loop import ClosedLoop
from controller.fleet import Fleet
from controller.groups import Groups
from controller.maintenance import MaintenanceWindows
from controller.profiles import Profiles
from controller.registry import Registry
from controller.rollouts import Rollouts
from controller.service import Controller
from controller.telemetry import TelemetryStore
from controller.tenants import DeviceTenants


class BearerToken(SecurityBase):
    """The bearer token of a request, or None; declared as the API document's ``HTTPBearer``
    scheme. Read with :func:`controller.auth.parse_bearer`, the one parser, which the upload
    guard (:class:`controller.api.app.BodyLimitGuard`) also uses before a route is matched."""

    def __init__(self, description: str) -> None:
        self.model = HTTPBearerModel(description=description)
        self.scheme_name = "HTTPBearer"

    async def __call__(self, request: Request) -> str | None:
        return parse_bearer(request.headers.get("Authorization", ""))


_bearer = BearerToken(
    "The admin token printed by `edgefleet controller init`, or one made by `edgefleet tokens create`"
)
SESSION_COOKIE = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
_session = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="The console's session (/ui/login)"
)


def get_controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


ControllerDep = Annotated[Controller, Depends(get_controller)]


# -- roles: the one place every route's caller is identified and checked ------------

ROLE_KEY = "x-minimum-role"
PUBLIC: Final = "public"


def minimum_role(role: Role | Literal["public"]) -> dict[str, str]:
    """Declares a route's minimum role beside it: ``openapi_extra=minimum_role(Role.ADMIN)``.
    Without a declaration a route that only reads needs ``viewer`` and one that changes
    state ``operator``; ``PUBLIC`` opens a route to anyone (the console's login page)."""
    return {ROLE_KEY: str(role)}


def required_role(route: APIRoute | RouteContext) -> Role | str:
    """The minimum role of a route: its declaration, else read = viewer, change = operator."""
    declared = (route.openapi_extra or {}).get(ROLE_KEY)
    if declared == PUBLIC:
        return PUBLIC
    if declared is not None:
        return Role(declared)
    return Role.VIEWER if set(route.methods or ()) <= SAFE_METHODS else Role.OPERATOR


class LoginRequired(HTTPException):
    """A console page asked for without a live session: the browser is sent to the login page."""

    def __init__(self, path: str) -> None:
        super().__init__(
            status.HTTP_303_SEE_OTHER, "log in first", headers={"Location": f"/ui/login?next={path}"}
        )


def route_template(request: Request) -> str:
    """The matched route as written with its prefix (``/v1/rollouts/{rollout_id}/pause``), for the
    audit log; FastAPI keeps only the router's own route in the scope."""
    route = request.scope.get("route")
    templates: dict[int, str] | None = getattr(request.app.state, "route_templates", None)
    if templates is None:
        templates = {id(rc.original_route): str(rc.path) for rc in iter_route_contexts(request.app.routes)}
        request.app.state.route_templates = templates
    return templates.get(id(route), request.url.path)


def authorize(
    request: Request,
    controller: ControllerDep,
    token: Annotated[str | None, Depends(_bearer)],
    session: Annotated[str | None, Depends(_session)],
) -> Principal | None:
    """Applied to the whole application: identifies the caller by bearer token or console
    session (whose state-changing requests must carry the session's CSRF token) and checks
    the route's minimum role. The principal is left in the request state for the audit log."""
    route = request.scope.get("route")
    setattr(request.state, ROUTE_KEY, route_template(request))
    needed = required_role(route) if isinstance(route, APIRoute) else Role.ADMIN
    if needed == PUBLIC:
        return None
    principal: Principal | None = None
    if token is not None:
        principal = controller.accounts.resolve(token)
    elif session:
        live = controller.accounts.session(session)
        if live is not None:
            setattr(request.state, PRINCIPAL_KEY, live.principal)
            if request.method not in SAFE_METHODS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), live.csrf.encode()
            ):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header")
            principal = live.principal
            # The console's pages put it where their scripts send it back from.
            request.state.csrf = live.csrf
    if principal is None:
        if request.url.path.startswith("/ui") and request.method in SAFE_METHODS:
            raise LoginRequired(request.url.path)
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing, invalid, expired or revoked bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    setattr(request.state, PRINCIPAL_KEY, principal)
    assert isinstance(needed, Role)
    if not principal.role.allows(needed):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {principal.name!r} has role {principal.role.value}; this needs {needed.value} or above",
        )
    return principal


def get_registry(controller: ControllerDep) -> Registry:
    return controller.registry


def get_fleet(controller: ControllerDep) -> Fleet:
    return controller.fleet


def get_profiles(controller: ControllerDep) -> Profiles:
    return controller.profiles


def get_rollouts(controller: ControllerDep) -> Rollouts:
    return controller.rollouts


def get_telemetry(controller: ControllerDep) -> TelemetryStore:
    return controller.telemetry


def get_closed_loop(controller: ControllerDep) -> ClosedLoop:
    return controller.closed_loop


def get_tenants(controller: ControllerDep) -> DeviceTenants:
    return controller.tenants


def get_groups(controller: ControllerDep) -> Groups:
    return controller.rollouts.groups


def get_windows(controller: ControllerDep) -> MaintenanceWindows:
    return controller.rollouts.windows


RegistryDep = Annotated[Registry, Depends(get_registry)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
ProfilesDep = Annotated[Profiles, Depends(get_profiles)]
RolloutsDep = Annotated[Rollouts, Depends(get_rollouts)]
TelemetryDep = Annotated[TelemetryStore, Depends(get_telemetry)]
TenantsDep = Annotated[DeviceTenants, Depends(get_tenants)]
ClosedLoopDep = Annotated[ClosedLoop, Depends(get_closed_loop)]
GroupsDep = Annotated[Groups, Depends(get_groups)]
WindowsDep = Annotated[MaintenanceWindows, Depends(get_windows)]
PrincipalDep = Annotated[Principal | None, Depends(authorize)]
