"""What the chunk path asks of the fleet for every request: is the device known, and
when was it last seen. Both are answered from memory most of the time; real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from sqlalchemy import event

from controller.errors import BrokerAuthError
from controller.fleet import SEEN_WRITE_INTERVAL_S
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def stored_last_seen(parts: Parts, device_id: str) -> float | None:
    row = parts.store.query_one("SELECT last_seen FROM devices WHERE device_id = ?", (device_id,))
    assert row is not None
    value: float | None = row["last_seen"]
    return value


def test_a_device_registered_after_an_unknown_lookup_is_known(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    assert not parts.fleet.is_known("cam-1")
    parts.fleet.register("cam-1")
    assert parts.fleet.is_known("cam-1")
    statements: list[str] = []
    event.listen(
        parts.store.engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql)
    )
    assert parts.fleet.is_known("cam-1")
    assert statements == [], "a known device is answered from memory"
    assert not parts.fleet.is_known("cam-2")
    assert any("FROM devices" in s for s in statements), "an unknown one is looked up every time"


def test_an_undone_registration_leaves_the_device_unknown(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url, reload_command="false")
    with pytest.raises(BrokerAuthError):
        parts.fleet.register("cam-1")
    assert not parts.fleet.is_known("cam-1")


def test_last_seen_is_written_at_most_once_per_interval_and_shown_meanwhile(
    tmp_path: Path, store_url: str
) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    parts.fleet.note_seen("cam-1", 100.0)
    assert stored_last_seen(parts, "cam-1") == 100.0

    parts.fleet.note_seen("cam-1", 100.4)
    parts.fleet.note_seen("cam-1", 100.3)  # out of order (another worker): never goes back
    assert stored_last_seen(parts, "cam-1") == 100.0
    assert parts.fleet.get("cam-1").last_seen == 100.4
    assert [d.last_seen for d in parts.fleet.all()] == [100.4]

    parts.fleet.note_seen("cam-1", 100.0 + SEEN_WRITE_INTERVAL_S)
    assert stored_last_seen(parts, "cam-1") == 100.0 + SEEN_WRITE_INTERVAL_S


def test_flush_writes_what_was_held_back(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    for device_id in ("cam-1", "cam-2"):
        parts.fleet.register(device_id)
        parts.fleet.note_seen(device_id, 100.0)
        parts.fleet.note_seen(device_id, 100.5)
    assert parts.fleet.flush_seen() == 2
    assert stored_last_seen(parts, "cam-1") == stored_last_seen(parts, "cam-2") == 100.5
    assert parts.fleet.flush_seen() == 0
    # The flushed time counts as the last write: the next note within the interval waits.
    parts.fleet.note_seen("cam-1", 101.0)
    assert stored_last_seen(parts, "cam-1") == 100.5
    assert parts.fleet.get("cam-1").last_seen == 101.0


def test_a_state_message_touch_is_never_held_back_nor_undone(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    parts.fleet.note_seen("cam-1", 100.0)
    parts.fleet.note_seen("cam-1", 100.2)
    parts.fleet.touch("cam-1", 100.6)
    assert stored_last_seen(parts, "cam-1") == 100.6
    parts.fleet.flush_seen()
    assert stored_last_seen(parts, "cam-1") == 100.6 == parts.fleet.get("cam-1").last_seen


def test_held_back_last_seen_leaves_online_status_alone(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    parts.fleet.record_status("cam-1", fleet_pb2.DeviceStatus(online=True, at_ms=1, agent_version="t"))
    for i in range(20):
        parts.fleet.note_seen("cam-1", 100.0 + i / 100)
    device = parts.fleet.get("cam-1")
    assert device.online and device.last_seen == 100.19
    parts.fleet.record_status("cam-1", fleet_pb2.DeviceStatus(online=False, at_ms=2, agent_version="t"))
    parts.fleet.note_seen("cam-1", 100.5)
    assert not parts.fleet.get("cam-1").online
