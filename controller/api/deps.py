"""FastAPI dependencies, as ``Annotated`` aliases the routers import."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.auth import token_matches
from controller.closed_loop import ClosedLoop
from controller.fleet import Fleet
from controller.profiles import Profiles
from controller.registry import Registry
from controller.rollouts import Rollouts
from controller.service import Controller
from controller.telemetry import TelemetryStore
from controller.tenants import DeviceTenants

_bearer = HTTPBearer(auto_error=False, description="The admin token printed by `edgefleet controller init`")


def get_controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


ControllerDep = Annotated[Controller, Depends(get_controller)]


def require_token(
    controller: ControllerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or not token_matches(credentials.credentials, controller.admin_token_hash()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


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


RegistryDep = Annotated[Registry, Depends(get_registry)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
ProfilesDep = Annotated[Profiles, Depends(get_profiles)]
RolloutsDep = Annotated[Rollouts, Depends(get_rollouts)]
TelemetryDep = Annotated[TelemetryStore, Depends(get_telemetry)]
TenantsDep = Annotated[DeviceTenants, Depends(get_tenants)]
ClosedLoopDep = Annotated[ClosedLoop, Depends(get_closed_loop)]
Authenticated = Depends(require_token)
