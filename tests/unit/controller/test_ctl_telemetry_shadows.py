"""Shadow stats (issue 5) in the controller's telemetry: stored with their window, read back, served."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgefleet_proto import fleet_pb2

from controller.api.schemas import TelemetryPublic
from controller.store import Store
from controller.telemetry import TelemetryStore
from tests.unit.controller.helpers import Parts


def window(seq: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id="d", seq=seq, window_start_ms=0, window_end_ms=seq * 10)
    msg.shadows.add(
        tenant="cam",
        live_model_version="1",
        candidate_model_name="det",
        candidate_model_version="2",
        compared=40,
        top1_agreement=0.95,
        mean_abs_deviation=0.02,
        candidate_latency_p50_ms=3.0,
        candidate_latency_p95_ms=4.5,
        live_latency_p50_ms=2.5,
    )
    return msg


def test_shadow_stats_are_stored_and_served_with_their_window(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    parts.fleet.register("d")
    assert parts.telemetry.ingest_telemetry("d", window(1), received_at=1.0)
    assert parts.telemetry.ingest_telemetry("d", fleet_pb2.Telemetry(device_id="d", seq=2), received_at=2.0)
    rows = {r.seq: r for r in parts.telemetry.telemetry("d")}
    with_shadow = rows[1]
    assert rows[2].shadows == []
    (shadow,) = with_shadow.shadows
    assert shadow["candidate_model_version"] == "2" and shadow["top1_agreement"] == 0.95
    assert shadow["compared"] == 40 and shadow["candidate_latency_p95_ms"] == 4.5
    public = TelemetryPublic.model_validate(with_shadow)
    assert public.shadows[0].live_model_version == "1" and public.shadows[0].mean_abs_deviation == 0.02


def test_a_database_from_before_shadow_stats_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Store(path).close()  # the schema as it was: the telemetry table without the column
    conn = sqlite3.connect(path)
    assert not any(r[1] == "shadows" for r in conn.execute("PRAGMA table_info(telemetry)"))
    conn.execute("INSERT INTO devices (device_id, tags, password_hash, created_at) VALUES ('d', '[]', '', 0)")
    conn.execute(
        "INSERT INTO telemetry (device_id, received_at, seq, window_start_ms, window_end_ms, system, models,"
        " outbox_dropped) VALUES ('d', 1.0, 1, 0, 10, '{}', '[]', 0)"
    )
    conn.commit()
    conn.close()
    store = Store(path)
    telemetry = TelemetryStore(store)
    (old,) = telemetry.telemetry("d")
    assert old.shadows == []
    assert telemetry.ingest_telemetry("d", window(2), received_at=2.0)
    assert telemetry.telemetry("d")[0].shadows[0]["tenant"] == "cam"
    TelemetryStore(store)  # a second start finds the column there
    store.close()
