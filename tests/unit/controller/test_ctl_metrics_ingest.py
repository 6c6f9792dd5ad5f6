"""Batched telemetry ingest: one transaction per batch, and a bad window spoils only itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.topics import Kind, Topic

from controller.transport import Inbound, Transport
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def job(device: str, seq: int) -> Inbound:
    msg = fleet_pb2.Telemetry(device_id=device, seq=seq, window_start_ms=seq, window_end_ms=seq + 10)
    msg.models.add(tenant="default", model_name="m", model_version="1", inference_count=1)
    return Inbound(Topic(device, Kind.TELEMETRY), msg, received_at=5.0, retained=False)


def test_a_failing_window_is_dropped_alone_and_the_rest_of_the_batch_is_stored(
    tmp_path: Path, store_url: str
) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    for d in ("cam-1", "cam-2"):
        parts.fleet.register(d)
    seen: list[tuple[str, int]] = []

    def observer(device: str, msg: fleet_pb2.Telemetry, received_at: float) -> None:
        if msg.seq == 2:
            raise RuntimeError("observer failed")
        seen.append((device, msg.seq))

    parts.telemetry.observers.append(observer)
    transport = Transport(parts.settings, parts.fleet, parts.telemetry, parts.artifacts)
    transport._ingest([job("cam-1", 1), job("cam-2", 2), job("cam-1", 3), job("nobody", 4), None])
    stored = {(d, r.seq) for d in ("cam-1", "cam-2") for r in parts.telemetry.telemetry(d)}
    assert stored == {("cam-1", 1), ("cam-1", 3)}  # seq 2 rolled back with its savepoint
    # A batch goes device by device, each device's windows in arrival order: the fast path sees
    # cam-1's two windows before cam-2's fails, then the batch is written again window by window.
    assert seen == [("cam-1", 1), ("cam-1", 3), ("cam-1", 1), ("cam-1", 3)]
    assert parts.fleet.get("cam-1").last_seen == 5.0

    transport._ingest([job("cam-2", 5), job("cam-2", 5)])  # an outbox resend in the same batch
    assert [r.seq for r in parts.telemetry.telemetry("cam-2")] == [5]
