"""Shadow candidates' stats in the controller's telemetry: stored with their window, read back, served."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.api.schemas import TelemetryPublic
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


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


def test_shadow_stats_are_stored_and_served_with_their_window(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
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
