from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.device_events import DeviceEvents
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def window(seq: int, end_ms: int, temperature: float | None = None) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id="d", seq=seq, window_start_ms=end_ms - 10, window_end_ms=end_ms)
    msg.system.cpu_percent = 12.5
    msg.system.mem_total_bytes = 1000
    if temperature is not None:
        msg.system.temperature_c = temperature
    msg.models.add(
        tenant="default", model_name="m", model_version="1", inference_count=seq, latency_p50_ms=1.5
    )
    return msg


def test_telemetry_newest_window_first_and_resends_stored_once(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    tel = parts.telemetry
    assert tel.ingest_telemetry("d", window(1, 100, temperature=40.0), received_at=1.0)
    assert tel.ingest_telemetry("d", window(3, 300), received_at=2.0)
    # Delivered late by the outbox, and a duplicate of seq 1.
    assert tel.ingest_telemetry("d", window(2, 200), received_at=3.0)
    assert not tel.ingest_telemetry("d", window(1, 100), received_at=4.0)
    rows = tel.telemetry("d")
    assert [r.seq for r in rows] == [3, 2, 1]
    assert rows[2].system["temperature_c"] == 40.0 and rows[0].system["temperature_c"] is None
    assert rows[0].models[0]["inference_count"] == 3 and rows[0].models[0]["latency_p50_ms"] == 1.5
    assert [r.seq for r in tel.telemetry("d", limit=1)] == [3]
    assert tel.telemetry("other") == []


def test_events_newest_first(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    for at_ms, kind in ((5, "download_started"), (9, "model_activated"), (7, "chunk_rejected")):
        event = fleet_pb2.Event(device_id="d", at_ms=at_ms, kind=kind, severity="info", message=kind)
        event.attributes["digest"] = "abc"
        DeviceEvents(parts.store, quota=100).ingest("d", event, received_at=1.0)
    events = parts.telemetry.events("d", limit=2)
    assert [e.kind for e in events] == ["model_activated", "chunk_rejected"]
    assert events[0].attributes == {"digest": "abc"}


def test_store_uses_wal(tmp_path: Path, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("a SQLite setting")
    assert Parts(tmp_path).store.journal_mode() == "wal"
