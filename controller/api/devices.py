"""/v1/devices: register devices (credentials shown once) and read their state."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import FleetDep
from controller.api.schemas import DeviceCreate, DeviceCredentialsPublic, DevicePublic

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
