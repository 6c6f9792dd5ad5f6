"""Maintenance windows: cron in a time zone plus a duration, judged at a clock the test moves."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from controller.errors import InvalidWindow, WindowNotFound
from controller.groups import Groups, Query
from controller.maintenance import MaintenanceWindows, Schedule, combine, opening, validate
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

PARIS = ZoneInfo("Europe/Paris")


def at(text: str, zone: ZoneInfo = PARIS) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


NIGHTLY = Schedule("0 2 * * *", 7200.0, "Europe/Paris")


def test_a_window_is_open_from_each_match_for_its_duration_in_its_time_zone() -> None:
    assert opening(NIGHTLY, at("2026-12-08T02:00:00")).open
    inside = opening(NIGHTLY, at("2026-12-08T03:59:59"))
    assert inside.open and inside.closes_at == at("2026-12-08T04:00:00")
    before = opening(NIGHTLY, at("2026-12-07T14:30:00"))
    assert not before.open
    assert before.opens_at == at("2026-12-08T02:00:00")
    assert before.next_open == "2026-12-08T02:00+01:00"
    after = opening(NIGHTLY, at("2026-12-08T04:00:00"))
    assert not after.open and after.next_open == "2026-12-09T02:00+01:00"
    # The same instant, read in another zone, is outside a window in that zone's night.
    tokyo = Schedule("0 2 * * *", 7200.0, "Asia/Tokyo")
    assert not opening(tokyo, at("2026-12-08T02:30:00")).open


def test_a_window_lasts_real_seconds_across_a_daylight_saving_change() -> None:
    # Paris springs forward at 02:00 on 2026-03-29: a window opening at 01:30 for two hours
    # closes at 04:30 local (two real hours later), not at 03:30.
    early = Schedule("30 1 * * *", 7200.0, "Europe/Paris")
    assert opening(early, at("2026-03-29T04:15:00")).open
    assert not opening(early, at("2026-03-29T04:31:00")).open
    summer = opening(NIGHTLY, at("2026-06-01T12:00:00"))
    assert summer.next_open == "2026-06-02T02:00+02:00"


def test_weekday_windows_and_aliases() -> None:
    weekdays = validate("0 22 * * mon-fri", 3600, "UTC")
    friday_night = opening(weekdays, at("2026-12-11T22:30:00", ZoneInfo("UTC")))
    assert friday_night.open
    saturday = opening(weekdays, at("2026-12-12T22:30:00", ZoneInfo("UTC")))
    assert not saturday.open and saturday.next_open == "2026-12-14T22:00+00:00"
    assert validate("@daily", 60, "UTC").cron == "@daily"
    assert validate("  0   2 * *  * ", 60, "UTC").cron == "0 2 * * *"


@pytest.mark.parametrize(
    ("cron", "duration", "zone", "named"),
    [
        ("61 * * * *", 60, "UTC", "cron '61 * * * *'"),
        ("* * * *", 60, "UTC", "five fields"),
        ("0 2 * * * *", 60, "UTC", "five fields"),
        ("0 2 30 2 *", 60, "UTC", "never matches"),
        ("nonsense", 60, "UTC", "five fields"),
        ("", 60, "UTC", "cron"),
        ("0 2 * * *", 60, "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("0 2 * * *", 60, "../etc/passwd", "unknown time zone"),
        ("0 2 * * *", 0, "UTC", "duration_s"),
        ("0 2 * * *", -5, "UTC", "duration_s"),
        ("0 2 * * *", math.nan, "UTC", "duration_s"),
        ("0 2 * * *", 40 * 86400, "UTC", "duration_s"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(
    cron: str, duration: float, zone: str, named: str
) -> None:
    with pytest.raises(InvalidWindow, match=named.replace("*", r"\*").replace("(", r"\(")):
        validate(cron, duration, zone)


def test_a_device_is_open_while_any_window_is_and_waits_for_the_earliest_next_opening() -> None:
    morning = Schedule("0 6 * * *", 600.0, "UTC")
    now = at("2026-12-07T14:30:00")
    status = combine([opening(NIGHTLY, now), opening(morning, now)])
    assert not status.open and status.opens_at == at("2026-12-08T02:00:00")
    assert status.reason == "waiting for maintenance window (next opens 2026-12-08T02:00+01:00)"
    assert combine([]).open
    assert combine([opening(NIGHTLY, at("2026-12-08T02:10:00")), opening(morning, now)]).open


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    for device_id, tags in (("cam-1", ["site-a"]), ("cam-2", ["site-a"]), ("cam-3", ["site-b"])):
        p.fleet.register(device_id, tags)
    return p


def test_windows_of_a_device_replace_its_groups_and_a_group_window_covers_new_dynamic_members(
    parts: Parts,
) -> None:
    groups = Groups(parts.store)
    windows = MaintenanceWindows(parts.store, groups)
    groups.create("site-a", query=Query(tags=("site-a",)))
    groups.create("lab", devices=["cam-3"])
    nightly = windows.add("0 2 * * *", 7200, "Europe/Paris", group="site-a")
    own = windows.add("0 12 * * *", 3600, "UTC", device_id="cam-2")
    noon_utc = at("2026-12-07T12:30:00", ZoneInfo("UTC"))
    statuses = windows.statuses(["cam-1", "cam-2", "cam-3", "cam-4"], noon_utc)
    assert not statuses["cam-1"].open and "2026-12-08T02:00+01:00" in statuses["cam-1"].reason
    assert statuses["cam-2"].open  # its own window, not site-a's
    assert statuses["cam-3"].open and statuses["cam-4"].open  # no window: any time
    parts.fleet.register("cam-4", ["site-a"])
    assert not windows.statuses(["cam-4"], noon_utc)["cam-4"].open
    assert [w.id for w in windows.all(group="site-a")] == [nightly.id]
    assert windows.remove(own.id).device_id == "cam-2"
    assert not windows.statuses(["cam-2"], noon_utc)["cam-2"].open
    with pytest.raises(WindowNotFound):
        windows.remove(own.id)
    groups.delete("site-a")
    assert windows.all() == []


def test_a_window_for_an_unknown_group_or_device_or_both_is_refused_and_nothing_is_stored(
    parts: Parts,
) -> None:
    windows = MaintenanceWindows(parts.store, Groups(parts.store))
    with pytest.raises(InvalidWindow, match="unknown group nowhere"):
        windows.add("0 2 * * *", 60, "UTC", group="nowhere")
    with pytest.raises(InvalidWindow, match="unknown device ghost"):
        windows.add("0 2 * * *", 60, "UTC", device_id="ghost")
    with pytest.raises(InvalidWindow, match="exactly one"):
        windows.add("0 2 * * *", 60, "UTC")
    with pytest.raises(InvalidWindow, match="time zone"):
        windows.add("0 2 * * *", 60, "Nowhere/Land", device_id="cam-1")
    assert windows.all() == []
