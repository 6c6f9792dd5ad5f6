"""/v1/devices: register devices (credentials shown once), read their state, declare their tenants."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller import outbox_losses
from controller.api.deps import ControllerDep, FleetDep, TenantsDep, minimum_role
from controller.api.responses import errors
from controller.api.schemas import (
    DeviceBatchCreate,
    DeviceCertificateCreate,
    DeviceCertificatePublic,
    DeviceCreate,
    DeviceCredentialsPublic,
    DevicePublic,
    DeviceRevokeCreate,
    DeviceRevokedPublic,
    OutboxLossesPublic,
    TenantCreate,
    TenantPublic,
)
from controller.auth import Role
from controller.certificates import broker_ca_pem
from controller.fleet import Device, Registration

router = APIRouter(tags=["devices"])


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCredentialsPublic,
    responses=errors(409, 503),
    openapi_extra=minimum_role(Role.ADMIN),
)
def register_device(body: DeviceCreate, controller: ControllerDep) -> DeviceCredentialsPublic:
    credentials = controller.fleet.register(body.device_id, body.tags, body.profile)
    public = DeviceCredentialsPublic.model_validate(credentials)
    return public.model_copy(update={"broker_ca_pem": broker_ca_pem(controller.settings.mqtt_tls_ca_file)})


@router.post(
    "/device-batches",
    status_code=status.HTTP_201_CREATED,
    response_model=list[DeviceCredentialsPublic],
    responses=errors(409, 503),
    openapi_extra=minimum_role(Role.ADMIN),
)
def register_devices(body: DeviceBatchCreate, controller: ControllerDep) -> list[DeviceCredentialsPublic]:
    """Register many devices at once, all or none: one broker password-file rewrite and reload
    for the batch (registering a fleet one device at a time rewrites the file per device)."""
    registered = controller.fleet.register_many(
        [Registration(d.device_id, tuple(d.tags), d.profile) for d in body.devices]
    )
    ca = broker_ca_pem(controller.settings.mqtt_tls_ca_file)
    return [
        DeviceCredentialsPublic.model_validate(c).model_copy(update={"broker_ca_pem": ca}) for c in registered
    ]


@router.post(
    "/devices/{device_id}/certificate",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCertificatePublic,
    responses=errors(409),
    openapi_extra=minimum_role(Role.ADMIN),
)
def issue_device_certificate(
    device_id: str, body: DeviceCertificateCreate, controller: ControllerDep
) -> DeviceCertificatePublic:
    """A client certificate from the controller's CA for a registered device's public key
    (recorded, so that revoking the device revokes it); a revoked device gets none (409)."""
    controller.fleet.get(device_id)
    controller.revocations.refuse_revoked(device_id)
    issued = controller.certificates.issue_client(device_id, body.public_key_pem, body.valid_days)
    controller.revocations.record_issued(device_id, issued)
    return DeviceCertificatePublic(
        device_id=device_id,
        serial=f"{issued.serial:x}",
        certificate_pem=issued.certificate_pem,
        not_after=issued.not_after,
        ca_pem=controller.certificates.cert_pem,
        broker_ca_pem=broker_ca_pem(controller.settings.mqtt_tls_ca_file),
    )


@router.post(
    "/devices/{device_id}/revoke",
    response_model=DeviceRevokedPublic,
    responses=errors(503),
    openapi_extra=minimum_role(Role.ADMIN),
)
def revoke_device(
    device_id: str, controller: ControllerDep, body: DeviceRevokeCreate | None = None
) -> DeviceRevokedPublic:
    """Revoke a device for good: its certificates on the CA's revocation list, its password off
    the broker, its session on the broker ended, what it still sends ignored."""
    revoked = controller.revocations.revoke(device_id, body.reason if body is not None else "")
    return DeviceRevokedPublic.model_validate(revoked)


@router.get("/devices", response_model=list[DevicePublic])
def list_devices(controller: ControllerDep) -> list[DevicePublic]:
    fleet = controller.fleet
    losses = outbox_losses.read_all(fleet.store)
    revoked = controller.revocations.all_revoked()
    return [_public(d, losses.get(d.device_id), revoked.get(d.device_id)) for d in fleet.all()]


@router.get("/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, controller: ControllerDep) -> DevicePublic:
    fleet = controller.fleet
    return _public(
        fleet.get(device_id),
        outbox_losses.read(fleet.store, device_id),
        controller.revocations.revoked_at(device_id),
    )


def _public(
    device: Device, losses: outbox_losses.OutboxLosses | None, revoked_at: float | None
) -> DevicePublic:
    public = DevicePublic.model_validate(device)
    if losses is not None:
        public.outbox_losses = OutboxLossesPublic.model_validate(losses)
    public.revoked_at = revoked_at
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
