"""Response bodies of /v1/export/{table}: a page of stored rows and where the next one starts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from controller.api.schemas import EventPublic, TelemetryPublic


class TelemetryExportRow(TelemetryPublic):
    id: int = Field(description="the window's row id on this controller (stable: an export's key)")
    device_id: str


class EventExportRow(EventPublic):
    id: int = Field(description="the event's row id on this controller (stable: an export's key)")
    device_id: str


class _Page(BaseModel):
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null when the range is exhausted"
    )
    total: int | None = Field(
        description="rows in the whole range, counted for the first page (no cursor); null on later pages"
    )


class TelemetryExportPage(_Page):
    table: Literal["telemetry"]
    rows: list[TelemetryExportRow]


class EventExportPage(_Page):
    table: Literal["events"]
    rows: list[EventExportRow]


ExportPagePublic = Annotated[TelemetryExportPage | EventExportPage, Field(discriminator="table")]
