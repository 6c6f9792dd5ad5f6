"""/v1/export/{table}: stored telemetry windows or device events of a time range, page by page
(what ``edgefleet telemetry export`` writes into a SQLite file)."""

from __future__ import annotations

from typing import Annotated

from edgefleet_proto.topics import _DEVICE_ID as DEVICE_ID
from fastapi import APIRouter, Query

from controller import telemetry_export
from controller.api.deps import ControllerDep
from controller.api.export_schemas import (
    EventExportPage,
    EventExportRow,
    ExportPagePublic,
    TelemetryExportPage,
    TelemetryExportRow,
)
from controller.telemetry_export import Cursor, Range, Table

router = APIRouter(tags=["telemetry"])

# What Cursor.encode makes: unpadded base64url.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"


@router.get("/export/{table}", response_model=ExportPagePublic)
def export_page(
    table: Table,
    controller: ControllerDep,
    device: Annotated[
        list[Annotated[str, Query(pattern=DEVICE_ID.pattern)]],
        Query(description="only these devices (repeat the parameter); all when absent"),
    ] = [],  # noqa: B006 (FastAPI copies a query list's default per request)
    since_ms: Annotated[int | None, Query(description="device time from (included), epoch ms")] = None,
    until_ms: Annotated[int | None, Query(description="device time until (excluded), epoch ms")] = None,
    cursor: Annotated[
        str | None,
        Query(pattern=CURSOR_PATTERN, max_length=2048, description="the previous page's next_cursor"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=telemetry_export.MAX_PAGE)] = telemetry_export.DEFAULT_PAGE,
) -> TelemetryExportPage | EventExportPage:
    """Rows device by device in device id order, each device's in its own time order (a window's
    end, an event's time), then id; filtered by the device's clock. 404 names unknown devices,
    422 an empty time range or a cursor this API did not make."""
    page = telemetry_export.read_page(
        controller.store,
        table,
        Range(tuple(device), since_ms, until_ms),
        Cursor.decode(cursor) if cursor is not None else None,
        limit,
    )
    next_cursor = page.next_cursor.encode() if page.next_cursor is not None else None
    if table == "telemetry":
        return TelemetryExportPage(
            table="telemetry",
            rows=[TelemetryExportRow.model_validate(r) for r in page.rows],
            next_cursor=next_cursor,
            total=page.total,
        )
    return EventExportPage(
        table="events",
        rows=[EventExportRow.model_validate(r) for r in page.rows],
        next_cursor=next_cursor,
        total=page.total,
    )
