"""Stored windows and events read page by page for an export: every row of the range once, in
(device, device time, id) order, whatever the page size, with a cursor that survives rows
stored meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2

from controller.device_events import DeviceEvents
from controller.errors import DeviceNotFound, InvalidInputError
from controller.telemetry_export import Cursor, Page, Range, read_page
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def window(device_id: str, seq: int, end_ms: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id=device_id, seq=seq, window_start_ms=end_ms - 10, window_end_ms=end_ms)
    msg.models.add(tenant="default", model_name="m", model_version="1", inference_count=seq)
    return msg


def fleet_with_windows(tmp_path: Path, store_url: str) -> Parts:
    """Three devices; cam-b's windows arrive out of their time order (an outbox resend)."""
    parts = Parts(tmp_path, database_url=store_url)
    for device_id in ("cam-c", "cam-a", "cam-b", "idle"):
        parts.fleet.register(device_id)
    arrivals = [("cam-a", s, 1000 * s) for s in range(1, 8)]
    arrivals += [("cam-b", s, 1000 * s) for s in (5, 1, 3, 2, 4)]
    arrivals += [("cam-c", s, 1000 * s) for s in range(1, 4)]
    parts.telemetry.ingest_many([(d, window(d, s, end), 10.0 + i) for i, (d, s, end) in enumerate(arrivals)])
    return parts


def read_all(parts: Parts, table: Any, where: Range, limit: int) -> tuple[list[Any], list[Page[Any]]]:
    pages = [read_page(parts.store, table, where, None, limit)]
    while pages[-1].next_cursor is not None:
        pages.append(read_page(parts.store, table, where, pages[-1].next_cursor, limit))
    return [r for p in pages for r in p.rows], pages


@pytest.mark.parametrize("limit", [1, 3, 7, 15, 1000])
def test_every_window_once_in_device_then_time_order_at_any_page_size(
    tmp_path: Path, store_url: str, limit: int
) -> None:
    parts = fleet_with_windows(tmp_path, store_url)
    rows, pages = read_all(parts, "telemetry", Range(), limit)
    expected = [("cam-a", s) for s in range(1, 8)] + [("cam-b", s) for s in range(1, 6)]
    expected += [("cam-c", s) for s in range(1, 4)]
    assert [(r.device_id, r.seq) for r in rows] == expected
    assert len({r.id for r in rows}) == 15
    assert pages[0].total == 15 and all(p.total is None for p in pages[1:])
    assert all(len(p.rows) == limit for p in pages[:-1])
    assert rows[0].models[0]["inference_count"] == 1 and rows[0].window_end_ms == 1000


def test_the_range_is_read_on_the_devices_clocks_and_devices_can_be_named(
    tmp_path: Path, store_url: str
) -> None:
    parts = fleet_with_windows(tmp_path, store_url)
    rows, pages = read_all(parts, "telemetry", Range(("cam-c", "cam-b"), since_ms=2000, until_ms=4000), 2)
    assert [(r.device_id, r.window_end_ms) for r in rows] == [
        ("cam-b", 2000),
        ("cam-b", 3000),
        ("cam-c", 2000),
        ("cam-c", 3000),
    ]
    assert pages[0].total == 4
    only_since, _ = read_all(parts, "telemetry", Range(since_ms=7000), 5)
    assert [(r.device_id, r.seq) for r in only_since] == [("cam-a", 7)]
    assert read_page(parts.store, "telemetry", Range(("idle",)), None, 10) == Page([], None, 0)


def test_windows_stored_while_paging_neither_repeat_nor_shift_a_page(tmp_path: Path, store_url: str) -> None:
    parts = fleet_with_windows(tmp_path, store_url)
    first = read_page(parts.store, "telemetry", Range(), None, 4)
    assert [(r.device_id, r.seq) for r in first.rows] == [("cam-a", s) for s in range(1, 5)]
    # A late window before the cursor, and one after it.
    parts.telemetry.ingest_many(
        [("cam-a", window("cam-a", 99, 500), 50.0), ("cam-a", window("cam-a", 8, 8000), 51.0)]
    )
    second = read_page(parts.store, "telemetry", Range(), first.next_cursor, 4)
    assert [(r.device_id, r.seq) for r in second.rows] == [
        ("cam-a", 5),
        ("cam-a", 6),
        ("cam-a", 7),
        ("cam-a", 8),
    ]


def test_events_page_the_same_way(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-a")
    parts.fleet.register("cam-b")
    events = DeviceEvents(parts.store, quota=100)
    for device_id in ("cam-b", "cam-a"):
        for at_ms in (30, 10, 20):
            event = fleet_pb2.Event(device_id=device_id, at_ms=at_ms, kind="k", severity="info", message="m")
            event.attributes["at"] = str(at_ms)
            events.ingest(device_id, event, received_at=1.0)
    rows, pages = read_all(parts, "events", Range(since_ms=15), 3)
    assert [(r.device_id, r.at_ms) for r in rows] == [
        ("cam-a", 20),
        ("cam-a", 30),
        ("cam-b", 20),
        ("cam-b", 30),
    ]
    assert rows[0].attributes == {"at": "20"} and pages[0].total == 4


def test_unknown_devices_an_empty_range_and_a_foreign_cursor_are_refused(
    tmp_path: Path, store_url: str
) -> None:
    parts = fleet_with_windows(tmp_path, store_url)
    with pytest.raises(DeviceNotFound, match="unknown devices ghost, nobody"):
        read_page(parts.store, "telemetry", Range(("cam-a", "nobody", "ghost")))
    for since_ms, until_ms in ((5000, 5000), (6000, 5000)):
        with pytest.raises(InvalidInputError, match="holds no time"):
            read_page(parts.store, "telemetry", Range(since_ms=since_ms, until_ms=until_ms))
    for text in ("nope", "e30", Cursor("cam-a", 1, 2).encode()[:-3], "WyJhIiwiMSIsMl0"):
        with pytest.raises(InvalidInputError, match="cursor"):
            Cursor.decode(text)
    assert Cursor.decode(Cursor("cam-a", 1000, 7).encode()) == Cursor("cam-a", 1000, 7)
    with pytest.raises(InvalidInputError, match="limit"):
        read_page(parts.store, "telemetry", Range(), None, 0)
