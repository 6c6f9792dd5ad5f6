"""Roll-ups, the retention policy and the Prometheus exposition, over a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2
from prometheus_client.parser import text_string_to_metric_families

from controller import metrics
from controller.baselines import Baselines, spec_message
from controller.device_events import DeviceEvents
from controller.rollups import Retention, Rollups
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

NOW = 10_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(
    end_ms: int, n: int, errors: int, p50: float, p99: float, version: str = "1"
) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(
        device_id="cam-1", seq=end_ms, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    msg.models.add(
        tenant="default",
        model_name="digits",
        model_version=version,
        inference_count=n,
        error_count=errors,
        latency_p50_ms=p50,
        latency_p95_ms=p50 * 2,
        latency_p99_ms=p99,
    )
    return msg


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.fleet.register("cam-1")
    p.fleet.register("cam-2")
    return p


def test_rollups_weight_latency_by_inferences_and_keep_the_worst_p99(parts: Parts) -> None:
    rollups = Rollups(parts.store, 60, Retention(3600, 86_400), Clock(NOW))
    parts.telemetry.observers.append(rollups.observe)
    t0 = int(NOW * 1000) - 50_000
    assert parts.telemetry.ingest_telemetry("cam-1", window(t0, 100, 1, 1.0, 5.0), NOW)
    assert parts.telemetry.ingest_telemetry("cam-1", window(t0 + 10_000, 300, 2, 3.0, 9.0), NOW)
    assert not parts.telemetry.ingest_telemetry("cam-1", window(t0 + 10_000, 300, 2, 3.0, 9.0), NOW)  # resend
    (row,) = rollups.query(device_id="cam-1")
    assert (row["windows"], row["inference_count"], row["error_count"]) == (2, 400, 3)
    assert row["latency_p50_ms"] == pytest.approx((100 * 1.0 + 300 * 3.0) / 400)
    assert row["latency_p99_ms"] == 9.0
    (v,) = rollups.by_version(300.0, NOW)
    assert v.inference_rate == pytest.approx(400 / 300) and v.error_rate == pytest.approx(3 / 400)


def test_retention_prunes_raw_rows_and_old_buckets(parts: Parts) -> None:
    clock = Clock(NOW)
    rollups = Rollups(parts.store, 60, Retention(telemetry_s=100, rollup_s=1000), clock)
    parts.telemetry.observers.append(rollups.observe)
    parts.telemetry.ingest_telemetry("cam-1", window(int((NOW - 2000) * 1000), 1, 0, 1, 1), NOW - 2000)
    parts.telemetry.ingest_telemetry("cam-1", window(int((NOW - 500) * 1000), 1, 0, 1, 1), NOW - 500)
    parts.telemetry.ingest_telemetry("cam-1", window(int(NOW * 1000), 1, 0, 1, 1), NOW)
    ev = fleet_pb2.Event(device_id="cam-1", at_ms=1, kind="x", severity="info")
    DeviceEvents(parts.store, quota=100).ingest("cam-1", ev, NOW - 200)
    removed = rollups.prune()
    assert removed == {"telemetry": 2, "events": 1, "drift_sketches": 0, "telemetry_rollups": 1}
    assert len(parts.telemetry.telemetry("cam-1")) == 1
    assert len(rollups.query()) == 2
    assert rollups.prune() == {"telemetry": 0, "events": 0, "drift_sketches": 0, "telemetry_rollups": 0}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_has_fleet_model_drift_rollout_and_run_figures(parts: Parts) -> None:
    clock = Clock(NOW)
    rollups = Rollups(parts.store, 60, Retention(3600, 86_400), clock)
    baselines = Baselines(parts.store, 60, clock)
    parts.telemetry.observers += [rollups.observe, baselines.observe]
    parts.store.execute("UPDATE devices SET online = 1 WHERE device_id = 'cam-1'")
    # Labels carry registered names only: digits 1 is in the registry.
    parts.store.execute("INSERT INTO models (name, created_at) VALUES ('digits', 0)")
    parts.store.execute(
        "INSERT INTO model_versions (name, version, digest, size, format, inputs, outputs, metadata, created_at)"
        " VALUES ('digits', '1', '', 0, 'onnx', '[]', '[]', '{}', 0)"
    )
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 2))
    baseline = baselines.set_reference("digits", "1", ref, None, bins=5)
    spec = spec_message("default", "digits", "1", baseline.spec)
    from agent.drift_sketch import build_sketch

    msg = window(int(NOW * 1000) - 1000, 600, 6, 2.0, 8.0)
    msg.drift.append(build_sketch(spec, ref + 3.0))
    parts.telemetry.ingest_telemetry("cam-1", msg, NOW - 1)
    parts.store.execute(
        "INSERT INTO retraining_runs VALUES ('r1', 'p', 1, 'digits', '1', '[]', '[]', 'failed', '', 1, '', 0, 0)"
    )

    class Rollout:
        def __init__(self, status: str) -> None:
            self.status = status

    sources = metrics.Sources(
        parts.store,
        rollups,
        baselines,
        lambda: [Rollout("in_progress"), Rollout("succeeded"), Rollout("succeeded")],
        clock,
    )
    got = samples(metrics.render(sources).decode())
    version = (("model", "digits"), ("version", "1"))
    assert got[("edgefleet_devices", ())] == 2 and got[("edgefleet_devices_online", ())] == 1
    assert got[("edgefleet_model_inference_rate", version)] == pytest.approx(600 / metrics.RATE_WINDOW_S)
    assert got[("edgefleet_model_error_rate", version)] == pytest.approx(0.01)
    assert got[("edgefleet_model_latency_ms", (version[0], ("quantile", "0.99"), version[1]))] == 8.0
    assert got[("edgefleet_rollouts", (("state", "succeeded"),))] == 2
    assert got[("edgefleet_drift_psi", version)] > 1.0
    assert got[("edgefleet_device_drift_psi", (("device", "cam-1"), *version))] > 1.0
    assert got[("edgefleet_retraining_runs_total", (("policy", "p"), ("status", "failed")))] == 1
