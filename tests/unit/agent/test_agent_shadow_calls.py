"""gRPC calls compared with the tenant's shadow candidate off the caller's path: a lane of their
own, bounded, dropping its oldest when full (counted). Real onnxruntime sessions, no broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.pipeline import SHADOW_QUEUE, SHADOW_WEIGHT, Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.shadow import compare
from agent.telemetry import PipelineStats
from tests.unit.agent.models import linear_model, write_model


def serve(pool: ModelPool, tenant: str, path: Path, digest: str, version: str) -> ServingModel:
    model = pool.load(digest, path, "onnxruntime")
    serving = ServingModel(tenant, "m", version, digest, "onnxruntime", path, model)
    pool.put(serving)
    return serving


@pytest.fixture
def pipelines() -> Pipelines:
    return Pipelines(
        "dev-1", ModelPool(threads=1), 1, PipelineStats(), lambda *a: None, lambda *a: None, ResultHub()
    )


def test_calls_past_the_shadow_queue_are_dropped_and_counted_the_rest_compared(
    pipelines: Pipelines, tmp_path: Path
) -> None:
    live = serve(
        pipelines.pool, "app", tmp_path / "l.onnx", write_model(tmp_path / "l.onnx", linear_model(1)), "1"
    )
    cand_path = tmp_path / "c.onnx"
    serve(pipelines.pool, "app.shadow", cand_path, write_model(cand_path, linear_model(2)), "2")
    rng = np.random.default_rng(0)
    calls = []
    for _ in range(SHADOW_QUEUE + 3):
        x = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
        out = live.model.run(x)
        calls.append((x, out))
        # The scheduler's workers are not started: nothing runs, the call still returns at once.
        pipelines.offer_shadow("app", live, x, out, 1.0)
    pipelines.start()
    assert pipelines.scheduler.stop(10)

    tenants, shadows = pipelines.stats.drain(*pipelines.telemetry_inputs())
    candidate = pipelines.pool.get("app.shadow")
    assert candidate is not None
    kept = [compare(out, candidate.model.run(x)) for x, out in calls[3:]]  # the oldest were dropped
    [s] = shadows
    assert (s.tenant, s.live_model_version, s.candidate_model_version, s.compared) == (
        "app",
        "1",
        "2",
        SHADOW_QUEUE,
    )
    assert s.top1_agreement == pytest.approx(np.mean([c.top1 for c in kept]))
    assert s.mean_abs_deviation == pytest.approx(np.mean([c.mean_abs_deviation for c in kept]))
    lane = next(t for t in tenants if t.tenant == "app.shadow")
    assert (lane.dropped, lane.weight) == (3, SHADOW_WEIGHT) and lane.busy_s > 0


def test_without_a_candidate_nothing_is_queued_and_a_cleared_one_drops_its_lane(
    pipelines: Pipelines, tmp_path: Path
) -> None:
    path = tmp_path / "l.onnx"
    live = serve(pipelines.pool, "app", path, write_model(path, linear_model(1)), "1")
    x = {"x": np.ones((1, 4), np.float32)}
    out = live.model.run(x)
    pipelines.offer_shadow("app", live, x, out, 1.0)
    assert not pipelines.scheduler.depth("app.shadow") and "app.shadow" not in pipelines.telemetry_inputs()[0]

    cand = tmp_path / "c.onnx"
    serve(pipelines.pool, "app.shadow", cand, write_model(cand, linear_model(2)), "2")
    pipelines.offer_shadow("app", live, x, out, 1.0)
    assert pipelines.scheduler.depth("app.shadow") == 1
    pipelines.pool.remove("app.shadow")
    pipelines.offer_shadow("app", live, x, out, 1.0)
    assert not pipelines.scheduler.depth("app.shadow") and "app.shadow" not in pipelines.telemetry_inputs()[0]
