"""What one device's telemetry can make the controller store, on a real mosquitto and real SQLite
with a device client holding the device's own credentials: roll-ups, tenant counters and drift
sketches carry only names the controller registered, a window from the future is rolled up
where it arrived, and stored drift sketches count towards the device's telemetry quota."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from controller import settings as settings_mod
from controller.rollups import MAX_AHEAD_MS
from controller.store import Store
from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, running
from tests.support.models import dense_of_size
from tests.support.waiting import wait_until

YEAR_2100_MS = 4_102_444_800_000


@contextmanager
def controller(broker: Broker, data_dir: Path, **limits: Any) -> Iterator[Ctl]:
    settings, token = init_controller(broker, data_dir)
    settings_mod.save(settings.with_changes(**limits))
    with running(broker, settings_mod.load(data_dir), token) as ctl:
        yield ctl


def sketch(model: str, version: str, tenant: str = "default", features: int = 4) -> fleet_pb2.DriftSketch:
    msg = fleet_pb2.DriftSketch(tenant=tenant, model_name=model, model_version=version, samples=10)
    for f in range(features):
        msg.features.add(name=f"f{f}", edges=[0.0, 1.0], counts=[1, 8, 1])
    return msg


def hostile_window(seq: int, end_ms: int) -> fleet_pb2.Telemetry:
    """A window naming what the device likes: fresh model, version and tenant names each time."""
    msg = fleet_pb2.Telemetry(
        device_id="cam-1", seq=seq, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    names = [uuid.uuid4().hex[:12] for _ in range(20)]
    for n in names:
        msg.models.add(tenant=f"t-{n}", model_name=f"m-{n}", model_version="1", inference_count=5)
        msg.tenants.add(tenant=f"t-{n}", samples=5, inferences=5, dropped=1, errors=0)
        msg.drift.append(sketch(f"m-{n}", "1", tenant=f"t-{n}"))
    msg.models.add(tenant="default", model_name="dense", model_version="1", inference_count=5)
    msg.models.add(tenant="default", model_name="dense", model_version=f"v-{names[0]}", inference_count=5)
    msg.tenants.add(tenant="default", samples=5, inferences=5)
    # The registered version's sketch, sent five times over: one is kept.
    for _ in range(5):
        msg.drift.append(sketch("dense", "1"))
    return msg


def rows(ctl: Ctl, sql: str) -> list[dict[str, Any]]:
    store = Store(ctl.settings.db_path)
    try:
        return store.query(sql)
    finally:
        store.close()


def stored_windows(ctl: Ctl) -> int:
    return len(ctl.api("GET", "/v1/devices/cam-1/telemetry?limit=1000").json())


def test_rollups_tenant_counters_and_drift_sketches_carry_only_registered_names(
    broker: Broker, tmp_path: Path
) -> None:
    with controller(broker, tmp_path / "controller") as ctl:
        ctl.upload(dense_of_size(tmp_path / "m.onnx", 0.05), "dense", "1")
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            now_ms = int(time.time() * 1000)
            for seq in range(1, 31):
                end_ms = YEAR_2100_MS + seq * 3_600_000 if seq % 3 == 0 else now_ms
                window = hostile_window(seq, end_ms)
                window.window_start_ms -= seq  # each window its own row
                peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(window))
            wait_until(lambda: stored_windows(ctl) == 30 or None, 30, "the 30 windows stored")
        finally:
            peer.close()
        received_ms = int(time.time() * 1000)

    rollups = rows(ctl, "SELECT * FROM telemetry_rollups WHERE device_id = 'cam-1'")
    assert {(r["model_name"], r["model_version"]) for r in rollups} == {
        ("dense", "1"),
        ("dense", "unregistered"),
        ("unregistered", "unregistered"),
    }
    assert {r["tenant"] for r in rollups} == {"default", "unregistered"}
    # A window ending in 2100 is rolled up where it arrived (a minute of clock skew is taken
    # as is): no bucket outlives the retention.
    assert max(r["bucket_start_ms"] for r in rollups) <= received_ms + MAX_AHEAD_MS
    assert len(rollups) <= 2 * 4, "at most two buckets of (version, tenant) pairs"
    assert sum(r["inference_count"] for r in rollups) == 30 * 22 * 5, "every inference still counted"
    registered = [r for r in rollups if (r["model_name"], r["model_version"]) == ("dense", "1")]
    assert sum(r["inference_count"] for r in registered) == 30 * 5

    counters = rows(ctl, "SELECT * FROM tenant_counters WHERE device_id = 'cam-1'")
    assert {r["tenant"] for r in counters} == {"default", "unregistered"}
    assert sum(r["dropped"] for r in counters) == 30 * 20

    sketches = rows(ctl, "SELECT * FROM drift_sketches WHERE device_id = 'cam-1'")
    assert {(r["model_name"], r["model_version"], r["tenant"]) for r in sketches} == {
        ("dense", "1", "default")
    }
    assert len(sketches) == 30, "one sketch per window for the registered version"


def test_stored_drift_sketches_count_towards_the_devices_telemetry_quota(
    broker: Broker, tmp_path: Path
) -> None:
    quota = 100_000
    with controller(broker, tmp_path / "controller", telemetry_quota_bytes=quota) as ctl:
        ctl.upload(dense_of_size(tmp_path / "m.onnx", 0.05), "dense", "1")
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            now_ms = int(time.time() * 1000)
            for seq in range(1, 61):
                msg = fleet_pb2.Telemetry(
                    device_id="cam-1", seq=seq, window_start_ms=now_ms - seq, window_end_ms=now_ms
                )
                # About 10 kB of sketch a window, next to a window of a few hundred bytes.
                msg.drift.append(sketch("dense", "1", features=200))
                peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(msg))

            def newest_stored() -> bool:
                return 60 in {t["seq"] for t in ctl.api("GET", "/v1/devices/cam-1/telemetry").json()}

            wait_until(newest_stored, 30, "the newest window stored")
        finally:
            peer.close()
    [row] = rows(
        ctl,
        "SELECT (SELECT coalesce(sum(length(sketch)), 0) FROM drift_sketches WHERE device_id = 'cam-1')"
        " + (SELECT coalesce(sum(length(system) + length(models) + length(shadows) + length(tenants)), 0)"
        " FROM telemetry WHERE device_id = 'cam-1') AS n",
    )
    assert 0 < row["n"] <= quota
    sketches = rows(ctl, "SELECT count(*) AS n FROM drift_sketches WHERE device_id = 'cam-1'")[0]["n"]
    assert 0 < sketches < 60, "the oldest sketches went with their windows"
