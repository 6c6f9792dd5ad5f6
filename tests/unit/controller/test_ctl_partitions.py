"""Raw telemetry and events on PostgreSQL: one partition per day of arrival, made ahead and on
demand; retention drops the days wholly past its cutoff and deletes within the day it falls in."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.device_events import DeviceEvents
from controller.partitions import AHEAD_DAYS, DAY_S
from controller.rollups import Retention, Rollups
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

NOW = 100 * DAY_S + 3600.0


def window(seq: int) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(
        device_id="cam-1", seq=seq, window_start_ms=seq * 1000, window_end_ms=seq * 1000 + 1
    )


def test_days_are_made_on_demand_and_ahead_and_retention_drops_whole_days(
    tmp_path: Path, store_url: str
) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    partitions = parts.store.partitions
    events = DeviceEvents(parts.store, quota=100)
    # Four days of arrivals, ten windows and an event each, and the current day.
    arrivals = [NOW - d * DAY_S for d in (3, 2, 1, 0)]
    for day, at in enumerate(arrivals):
        for i in range(10):
            assert parts.telemetry.ingest_telemetry("cam-1", window(day * 100 + i), at + i)
        events.ingest("cam-1", fleet_pb2.Event(device_id="cam-1", at_ms=day, kind="k", severity="info"), at)
    today = int(NOW // DAY_S)
    assert partitions.days("telemetry") == [today - 3, today - 2, today - 1, today]
    # A resend on another day is still the same window.
    assert not parts.telemetry.ingest_telemetry("cam-1", window(0), NOW)

    # Keep 1.5 days: the oldest day is dropped whole, the next one (where the cutoff falls) is
    # emptied row by row.
    rollups = Rollups(parts.store, 60, Retention(telemetry_s=1.5 * DAY_S, rollup_s=90 * DAY_S), lambda: NOW)
    cutoff = NOW - 1.5 * DAY_S
    removed = rollups.prune()
    assert removed["telemetry"] == 20 and removed["events"] == 2
    days = partitions.days("telemetry")
    assert days[:3] == [today - 2, today - 1, today] and days[-1] == today + AHEAD_DAYS
    assert partitions.days("events")[:3] == [today - 2, today - 1, today]
    left = parts.store.query("SELECT received_at FROM telemetry ORDER BY received_at")
    assert len(left) == 20 and all(r["received_at"] >= cutoff for r in left)
    assert rollups.prune()["telemetry"] == 0
