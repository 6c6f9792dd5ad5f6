"""/v1/devices: register devices (credentials shown once), read their state, declare their tenants."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import FleetDep, TenantsDep
from controller.api.schemas import (
    DeviceCreate,
    DeviceCredentialsPublic,
    DevicePublic,
    TenantCreate,
    TenantPublic,
)

router = APIRouter(tags=["devices"])


@router.post("/devices", status_code=status.HTTP_201_CREATED, response_model=DeviceCredentialsPublic)
def register_device(body: DeviceCreate, fleet: FleetDep) -> DeviceCredentialsPublic:
    return DeviceCredentialsPublic.model_validate(fleet.register(body.device_id, body.tags, body.profile))


@router.get("/devices", response_model=list[DevicePublic])
def list_devices(fleet: FleetDep) -> list[DevicePublic]:
    return [DevicePublic.model_validate(d) for d in fleet.all()]


@router.get("/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, fleet: FleetDep) -> DevicePublic:
    return DevicePublic.model_validate(fleet.get(device_id))


@router.put("/devices/{device_id}/tenants", response_model=list[TenantPublic])
def set_device_tenants(device_id: str, body: list[TenantCreate], tenants: TenantsDep) -> list[TenantPublic]:
    """Replace the tenants the controller declares on the device; its desired state is re-issued."""
    docs = [t.model_dump(exclude_defaults=True) | {"id": t.id} for t in body]
    return [TenantPublic.model_validate(t) for t in tenants.put(device_id, docs)]


@router.get("/devices/{device_id}/tenants", response_model=list[TenantPublic])
def get_device_tenants(device_id: str, fleet: FleetDep, tenants: TenantsDep) -> list[TenantPublic]:
    fleet.get(device_id)
    return [TenantPublic.model_validate(t) for t in tenants.get(device_id)]
