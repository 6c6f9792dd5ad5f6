"""/v1/devices: register devices (credentials shown once), read their state, declare their tenants."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller import outbox_losses
from controller.api.deps import ControllerDep, FleetDep, TenantsDep, minimum_role
from controller.api.responses import errors
from controller.api.schemas import (
    DeviceCertificateCreate,
    DeviceCertificatePublic,
    DeviceCreate,
    DeviceCredentialsPublic,
    DevicePublic,
    OutboxLossesPublic,
    TenantCreate,
    TenantPublic,
)
from controller.auth import Role
from controller.certificates import broker_ca_pem
from controller.fleet import Device

router = APIRouter(tags=["devices"])


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCredentialsPublic,
    responses=errors(409, 503),
    openapi_extra=minimum_role(Role.ADMIN),
)
def register_device(body: DeviceCreate, fleet: FleetDep) -> DeviceCredentialsPublic:
    return DeviceCredentialsPublic.model_validate(fleet.register(body.device_id, body.tags, body.profile))


@router.post(
    "/devices/{device_id}/certificate",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCertificatePublic,
    openapi_extra=minimum_role(Role.ADMIN),
)
def issue_device_certificate(
    device_id: str, body: DeviceCertificateCreate, controller: ControllerDep
) -> DeviceCertificatePublic:
    """A client certificate from the controller's CA for a registered device's public key."""
    controller.fleet.get(device_id)
    issued = controller.certificates.issue_client(device_id, body.public_key_pem, body.valid_days)
    return DeviceCertificatePublic(
        device_id=device_id,
        serial=f"{issued.serial:x}",
        certificate_pem=issued.certificate_pem,
        not_after=issued.not_after,
        ca_pem=controller.certificates.cert_pem,
        broker_ca_pem=broker_ca_pem(controller.settings.mqtt_tls_ca_file),
    )


@router.get("/devices", response_model=list[DevicePublic])
def list_devices(fleet: FleetDep) -> list[DevicePublic]:
    losses = outbox_losses.read_all(fleet.store)
    return [_public(d, losses.get(d.device_id)) for d in fleet.all()]


@router.get("/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, fleet: FleetDep) -> DevicePublic:
    return _public(fleet.get(device_id), outbox_losses.read(fleet.store, device_id))


def _public(device: Device, losses: outbox_losses.OutboxLosses | None) -> DevicePublic:
    public = DevicePublic.model_validate(device)
    if losses is not None:
        public.outbox_losses = OutboxLossesPublic.model_validate(losses)
    return public


@router.put("/devices/{device_id}/tenants", response_model=list[TenantPublic])
def set_device_tenants(
    device_id: str, body: list[TenantCreate], fleet: FleetDep, tenants: TenantsDep
) -> list[TenantPublic]:
    """Replace the tenants the controller declares on the device; its desired state is re-issued."""
    fleet.get(device_id)
    docs = [t.model_dump(exclude_defaults=True) | {"id": t.id} for t in body]
    return [TenantPublic.model_validate(t) for t in tenants.put(device_id, docs)]


@router.get("/devices/{device_id}/tenants", response_model=list[TenantPublic])
def get_device_tenants(device_id: str, fleet: FleetDep, tenants: TenantsDep) -> list[TenantPublic]:
    fleet.get(device_id)
    return [TenantPublic.model_validate(t) for t in tenants.get(device_id)]
