"""/v1/devices/{id}/telemetry and /events: newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controller.api.deps import FleetDep, TelemetryDep
from controller.api.schemas import EventPublic, TelemetryPublic
from controller.telemetry import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(tags=["telemetry"])

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


@router.get("/devices/{device_id}/telemetry", response_model=list[TelemetryPublic])
def device_telemetry(
    device_id: str, fleet: FleetDep, telemetry: TelemetryDep, limit: Limit = DEFAULT_LIMIT
) -> list[TelemetryPublic]:
    fleet.get(device_id)
    return [TelemetryPublic.model_validate(t) for t in telemetry.telemetry(device_id, limit)]


@router.get("/devices/{device_id}/events", response_model=list[EventPublic])
def device_events(
    device_id: str, fleet: FleetDep, telemetry: TelemetryDep, limit: Limit = DEFAULT_LIMIT
) -> list[EventPublic]:
    fleet.get(device_id)
    return [EventPublic.model_validate(e) for e in telemetry.events(device_id, limit)]
