"""Maintenance windows: when a rollout may send a device its update.

A window is a cron expression (five fields, minute resolution, or an alias such as
``@daily``) read in an IANA time zone, and a duration: it opens at each time the
expression matches and stays open that many seconds (real seconds, so a window across a
daylight-saving change lasts what it says). A window belongs to a device group or to one
device. A device with windows of its own follows those; otherwise it follows the windows
of every group it is in, open while any of them is; a device with no window may be
updated at any time.

The rollout engine asks, at its clock's ``now``, whether each member's windows are open
(:meth:`MaintenanceWindows.statuses`) and sends a device its update only then. Reverts
(rollback, abort) never wait: they take a misbehaving version away. An update sent inside
a window finishes even if the window closes meanwhile: the window gates when the
controller sends, not what the agent does with it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from controller.errors import InvalidWindow, WindowNotFound
from controller.groups import Groups
from controller.store import Store

# A window may last up to a month (a monthly cron with a long window); longer is a mistake.
MAX_DURATION_S = 31 * 86400.0
MAX_CRON_LENGTH = 200


@dataclass(frozen=True)
class Schedule:
    """When a window opens (``cron`` in ``timezone``) and for how long."""

    cron: str
    duration_s: float
    timezone: str

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Opening:
    """One window at one instant: open until ``closes_at``, or closed until ``opens_at``."""

    open: bool
    closes_at: float | None
    opens_at: float | None
    # ``opens_at`` as ISO 8601 to the minute in the window's own time zone.
    next_open: str


@dataclass(frozen=True)
class WindowStatus:
    """Whether a device's windows let a rollout update it now (no window: always)."""

    open: bool = True
    # While closed: the next opening of any of its windows (inf: none known).
    opens_at: float = math.inf
    # While closed: the sentence an operator reads in the rollout's device detail.
    reason: str = ""


ALWAYS = WindowStatus()


def validate(cron: str, duration_s: float, timezone: str) -> Schedule:
    """The schedule, or :class:`InvalidWindow` naming the field that is wrong."""
    cron = " ".join(cron.split())
    if not cron or len(cron) > MAX_CRON_LENGTH:
        raise InvalidWindow(f"cron: give an expression of five fields (at most {MAX_CRON_LENGTH} characters)")
    if not cron.startswith("@") and len(cron.split()) != 5:
        raise InvalidWindow(
            f"cron {cron!r}: use five fields (minute hour day-of-month month day-of-week), e.g. '0 2 * * *'"
        )
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidWindow(
            f"timezone: unknown time zone {timezone!r}; use an IANA name such as Europe/Paris"
        ) from None
    if not (0 < duration_s <= MAX_DURATION_S) or math.isnan(duration_s):
        raise InvalidWindow(
            f"duration_s must be more than 0 and at most {MAX_DURATION_S:g} (31 days), not {duration_s}"
        )
    try:
        croniter(cron, datetime.now(zone)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidWindow(f"cron {cron!r} never matches a date") from None
    except (CroniterBadCronError, CroniterError, ValueError, KeyError) as exc:
        raise InvalidWindow(f"cron {cron!r}: {exc}") from None
    return Schedule(cron, float(duration_s), timezone)


def opening(schedule: Schedule, now: float) -> Opening:
    """Where ``schedule`` stands at ``now`` (epoch seconds)."""
    zone = schedule.zone
    here = datetime.fromtimestamp(now, UTC).astimezone(zone)
    # croniter's previous match is strictly before its base: a base a microsecond later
    # counts a window opening exactly now as open.
    started = croniter(schedule.cron, here + timedelta(microseconds=1)).get_prev(datetime).timestamp()
    if now < started + schedule.duration_s:
        return Opening(True, started + schedule.duration_s, None, "")
    upcoming = croniter(schedule.cron, here).get_next(datetime)
    return Opening(False, None, upcoming.timestamp(), upcoming.astimezone(zone).isoformat(timespec="minutes"))


def combine(openings: Sequence[Opening]) -> WindowStatus:
    """A device's status from its windows' openings: open while any is."""
    if not openings or any(o.open for o in openings):
        return ALWAYS
    first = min(openings, key=lambda o: o.opens_at if o.opens_at is not None else math.inf)
    opens_at = first.opens_at if first.opens_at is not None else math.inf
    return WindowStatus(False, opens_at, f"waiting for maintenance window (next opens {first.next_open})")


@dataclass(frozen=True)
class Window:
    id: str
    group: str | None
    device_id: str | None
    schedule: Schedule
    created_at: float


class MaintenanceWindows:
    def __init__(self, store: Store, groups: Groups, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.groups = groups
        self.clock = clock

    def add(
        self,
        cron: str,
        duration_s: float,
        timezone: str,
        group: str | None = None,
        device_id: str | None = None,
    ) -> Window:
        if (group is None) == (device_id is None):
            raise InvalidWindow("a maintenance window belongs to a group or to a device: give exactly one")
        schedule = validate(cron, duration_s, timezone)
        if group is not None:
            if not self.groups.exists(group):
                raise InvalidWindow(f"unknown group {group} (see `edgefleet groups list`)")
        elif not self.store.query_one("SELECT device_id FROM devices WHERE device_id = ?", (device_id,)):
            raise InvalidWindow(f"unknown device {device_id}")
        window = Window(uuid.uuid4().hex[:12], group, device_id, schedule, self.clock())
        self.store.execute(
            "INSERT INTO maintenance_windows (id, group_name, device_id, cron, duration_s, timezone, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                window.id,
                group,
                device_id,
                schedule.cron,
                schedule.duration_s,
                schedule.timezone,
                window.created_at,
            ),
        )
        return window

    def remove(self, window_id: str) -> Window:
        window = self.get(window_id)
        self.store.execute("DELETE FROM maintenance_windows WHERE id = ?", (window_id,))
        return window

    def get(self, window_id: str) -> Window:
        row = self.store.query_one("SELECT * FROM maintenance_windows WHERE id = ?", (window_id,))
        if row is None:
            raise WindowNotFound(f"unknown maintenance window {window_id}")
        return _window(row)

    def all(self, group: str | None = None, device_id: str | None = None) -> list[Window]:
        sql, params = "SELECT * FROM maintenance_windows WHERE 1=1", []
        if group is not None:
            sql += " AND group_name = ?"
            params.append(group)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        return [_window(r) for r in self.store.query(sql + " ORDER BY created_at, id", params)]

    def applying(self, device_ids: Iterable[str]) -> dict[str, list[Window]]:
        """The windows each device follows: its own if it has any, else its groups'."""
        ids = list(device_ids)
        windows = self.all() if ids else []
        if not windows:
            return {d: [] for d in ids}
        own: dict[str, list[Window]] = {}
        by_group: dict[str, list[Window]] = {}
        for w in windows:
            if w.device_id is not None:
                own.setdefault(w.device_id, []).append(w)
            elif w.group is not None:
                by_group.setdefault(w.group, []).append(w)
        memberships = self.groups.memberships(by_group)
        return {d: own.get(d) or [w for g in memberships.get(d, []) for w in by_group[g]] for d in ids}

    def statuses(self, device_ids: Iterable[str], now: float) -> dict[str, WindowStatus]:
        """Whether each device's windows are open at ``now``; each window is evaluated once."""
        applying = self.applying(device_ids)
        openings: dict[str, Opening] = {}
        out: dict[str, WindowStatus] = {}
        for device_id, windows in applying.items():
            for w in windows:
                if w.id not in openings:
                    openings[w.id] = opening(w.schedule, now)
            out[device_id] = combine([openings[w.id] for w in windows])
        return out

    def openings(self, windows: Iterable[Window], now: float | None = None) -> Mapping[str, Opening]:
        at = self.clock() if now is None else now
        return {w.id: opening(w.schedule, at) for w in windows}


def _window(row: dict[str, Any]) -> Window:
    return Window(
        id=row["id"],
        group=row["group_name"],
        device_id=row["device_id"],
        schedule=Schedule(row["cron"], row["duration_s"], row["timezone"]),
        created_at=row["created_at"],
    )
