"""/v1/groups (static and dynamic device groups) and /v1/maintenance-windows (when a rollout
may update a group's or a device's devices). Changes need the operator role and are audited
like every state-changing request."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import Field

from controller.api.bodies import Create, Public
from controller.api.deps import FleetDep, GroupsDep, WindowsDep
from controller.api.responses import errors
from controller.fleet import _TAG as TAG
from controller.groups import MAX_DESCRIPTION, NAME_PATTERN, Group
from controller.groups import Query as GroupQuery
from controller.maintenance import MAX_DURATION_S, MaintenanceWindows, Opening, Window

router = APIRouter(tags=["groups"])


class GroupQueryIn(Create):
    tags: list[Annotated[str, Field(pattern=TAG.pattern)]] = Field(
        default_factory=list, description="devices carrying every one of these tags"
    )
    profile: str | None = Field(None, description="devices of this profile (edgefleet profiles list)")

    def to_query(self) -> GroupQuery:
        return GroupQuery(tuple(self.tags), self.profile)


class GroupDefinition(Create):
    devices: list[str] | None = Field(
        None, description="a static group: these registered devices (give this or query, not both)"
    )
    query: GroupQueryIn | None = Field(
        None, description="a dynamic group: the devices this query matches whenever the group is read"
    )
    description: str = Field("", max_length=MAX_DESCRIPTION)


class GroupCreate(GroupDefinition):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, '_', '.', '-'")


class GroupDevicesIn(Create):
    devices: list[str] = Field(min_length=1, description="registered devices to add to a static group")


class GroupQueryPublic(Public):
    tags: list[str]
    profile: str | None


class WindowCreate(Create):
    group: str | None = Field(None, description="the group the window applies to (or give device_id)")
    device_id: str | None = Field(None, description="the device the window applies to (or give group)")
    cron: str = Field(
        description="when the window opens: five cron fields (minute hour day-of-month month day-of-week)"
        " or an alias such as @daily, read in `timezone`",
        examples=["0 2 * * *"],
    )
    duration_s: float = Field(gt=0, le=MAX_DURATION_S, description="seconds the window stays open")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression, e.g. Europe/Paris")


class WindowPublic(Public):
    id: str
    group: str | None
    device_id: str | None
    cron: str
    duration_s: float
    timezone: str
    created_at: float
    open: bool = Field(description="whether the window is open now (by the rollout engine's clock)")
    closes_at: float | None = Field(description="while open: when it closes")
    opens_at: float | None = Field(description="while closed: when it opens next")
    next_open: str = Field(description="opens_at as ISO 8601 in the window's own time zone")


class GroupPublic(Public):
    name: str
    kind: str = Field(description="static (devices listed) or dynamic (a query)")
    devices: list[str] = Field(description="the members now: listed, or matching the query")
    query: GroupQueryPublic | None
    description: str
    created_at: float
    updated_at: float
    windows: list[WindowPublic] = Field(description="the group's maintenance windows")


class DeviceMaintenancePublic(Public):
    device_id: str
    open: bool = Field(description="whether a rollout may update the device now")
    opens_at: float | None = Field(description="while closed: when its next window opens")
    reason: str = Field(description="while closed: what a rollout waiting for it says")
    windows: list[WindowPublic] = Field(
        description="the windows it follows: its own if it has any, else those of its groups"
    )


def window_public(window: Window, at: Opening) -> WindowPublic:
    s = window.schedule
    return WindowPublic(
        id=window.id,
        group=window.group,
        device_id=window.device_id,
        cron=s.cron,
        duration_s=s.duration_s,
        timezone=s.timezone,
        created_at=window.created_at,
        open=at.open,
        closes_at=at.closes_at,
        opens_at=at.opens_at,
        next_open=at.next_open,
    )


def _windows_public(windows: MaintenanceWindows, found: list[Window]) -> list[WindowPublic]:
    openings = windows.openings(found)
    return [window_public(w, openings[w.id]) for w in found]


def _group_public(group: Group, windows: MaintenanceWindows) -> GroupPublic:
    q = group.query
    return GroupPublic(
        name=group.name,
        kind=group.kind,
        devices=list(group.devices),
        query=GroupQueryPublic(tags=list(q.tags), profile=q.profile) if q else None,
        description=group.description,
        created_at=group.created_at,
        updated_at=group.updated_at,
        windows=_windows_public(windows, windows.all(group=group.name)),
    )


# -- groups -------------------------------------------------------------------


@router.post(
    "/groups", status_code=status.HTTP_201_CREATED, response_model=GroupPublic, responses=errors(409)
)
def create_group(body: GroupCreate, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    """A static group (devices) or a dynamic one (query); an unknown device is refused (422)."""
    query = body.query.to_query() if body.query else None
    return _group_public(groups.create(body.name, body.devices, query, body.description), windows)


@router.get("/groups", response_model=list[GroupPublic])
def list_groups(groups: GroupsDep, windows: WindowsDep) -> list[GroupPublic]:
    return [_group_public(g, windows) for g in groups.all()]


@router.get("/groups/{name}", response_model=GroupPublic)
def get_group(name: str, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    return _group_public(groups.get(name), windows)


@router.put("/groups/{name}", response_model=GroupPublic)
def replace_group(name: str, body: GroupDefinition, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    """A new definition (static or dynamic) for an existing group; its windows stay."""
    query = body.query.to_query() if body.query else None
    return _group_public(groups.replace(name, body.devices, query, body.description), windows)


@router.delete("/groups/{name}", response_model=GroupPublic)
def delete_group(name: str, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    """Remove the group and its maintenance windows; rollouts made for it keep their devices."""
    public = _group_public(groups.get(name), windows)
    groups.delete(name)
    return public


@router.post("/groups/{name}/devices", response_model=GroupPublic)
def add_group_devices(name: str, body: GroupDevicesIn, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    """Add registered devices to a static group."""
    return _group_public(groups.add_devices(name, body.devices), windows)


@router.delete("/groups/{name}/devices/{device_id}", response_model=GroupPublic)
def remove_group_device(name: str, device_id: str, groups: GroupsDep, windows: WindowsDep) -> GroupPublic:
    return _group_public(groups.remove_device(name, device_id), windows)


# -- maintenance windows ------------------------------------------------------------


@router.post(
    "/maintenance-windows",
    status_code=status.HTTP_201_CREATED,
    response_model=WindowPublic,
)
def add_window(body: WindowCreate, windows: WindowsDep) -> WindowPublic:
    """A window of a group or of one device; a bad cron, time zone or target is refused (422)."""
    window = windows.add(body.cron, body.duration_s, body.timezone, body.group, body.device_id)
    return _windows_public(windows, [window])[0]


@router.get("/maintenance-windows", response_model=list[WindowPublic])
def list_windows(
    windows: WindowsDep,
    group: Annotated[str | None, Query(description="only this group's windows")] = None,
    device_id: Annotated[str | None, Query(description="only this device's own windows")] = None,
) -> list[WindowPublic]:
    return _windows_public(windows, windows.all(group, device_id))


@router.get("/maintenance-windows/{window_id}", response_model=WindowPublic)
def get_window(window_id: str, windows: WindowsDep) -> WindowPublic:
    return _windows_public(windows, [windows.get(window_id)])[0]


@router.delete("/maintenance-windows/{window_id}", response_model=WindowPublic)
def remove_window(window_id: str, windows: WindowsDep) -> WindowPublic:
    public = _windows_public(windows, [windows.get(window_id)])[0]
    windows.remove(window_id)
    return public


@router.get("/devices/{device_id}/maintenance", response_model=DeviceMaintenancePublic)
def device_maintenance(device_id: str, fleet: FleetDep, windows: WindowsDep) -> DeviceMaintenancePublic:
    """Whether a rollout may update the device now, and the windows that decide it."""
    fleet.get(device_id)
    now = windows.clock()
    following = windows.applying([device_id])[device_id]
    state = windows.statuses([device_id], now)[device_id]
    return DeviceMaintenancePublic(
        device_id=device_id,
        open=state.open,
        opens_at=None if state.open or state.opens_at == float("inf") else state.opens_at,
        reason=state.reason,
        windows=_windows_public(windows, following),
    )
