"""gRPC calls compared with the tenant's shadow candidate off the caller's path: a lane of their
own, bounded, dropping its oldest when full (counted). Real onnxruntime sessions, no broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.pipeline import SHADOW_QUEUE, SHADOW_WEIGHT, Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.signature import InputRole, ModelSignature, OutputMeaning
from agent.telemetry import PipelineStats
from tests.support.model_bytes import linear_model, write_model

# The signature says which output holds the class scores: top-1 agreement is read there.
SIGNATURE = ModelSignature(
    inputs=(InputRole("x", "source", "NC", 0, "float32", (-1, 4)),),
    outputs=(OutputMeaning("y", "scores", "float32", (-1, 3)),),
)


def serve(pool: ModelPool, tenant: str, path: Path, digest: str, version: str) -> ServingModel:
    model = pool.load(digest, path, "onnxruntime")
    serving = ServingModel(tenant, "m", version, digest, "onnxruntime", path, model, SIGNATURE)
    pool.put(serving)
    return serving


@pytest.fixture
def pipelines() -> Pipelines:
    return Pipelines(
        "dev-1", ModelPool(threads=1), 1, PipelineStats(), lambda *a: None, lambda *a: None, ResultHub()
    )


def test_calls_past_the_shadow_queue_are_dropped_and_counted_the_rest_compared_per_row(
    pipelines: Pipelines, tmp_path: Path
) -> None:
    live_path, cand_path = tmp_path / "l.onnx", tmp_path / "c.onnx"
    live = serve(pipelines.pool, "app", live_path, write_model(live_path, linear_model(1)), "1")
    serve(pipelines.pool, "app.shadow", cand_path, write_model(cand_path, linear_model(2)), "2")
    rng = np.random.default_rng(0)
    calls = []
    for i in range(SHADOW_QUEUE + 3):
        # Batches of different sizes: each row must weigh the same, whatever call it came in.
        x = {"x": rng.standard_normal((1 + i % 4, 4)).astype(np.float32)}
        out = live.model.run(x)
        calls.append((x, out))
        # The scheduler's workers are not started: nothing runs, the call still returns at once.
        pipelines.offer_shadow("app", live, x, out, 1.0)
    pipelines.start()
    assert pipelines.scheduler.stop(10)

    tenants, shadows = pipelines.stats.drain(*pipelines.telemetry_inputs())
    # The expected figures straight from onnxruntime, row by row, over the calls kept
    # (the oldest three were dropped).
    live_ort, cand_ort = ort.InferenceSession(str(live_path)), ort.InferenceSession(str(cand_path))
    x_kept = np.concatenate([x["x"] for x, _ in calls[3:]])
    want_live = live_ort.run(None, {"x": x_kept})[0]
    want_cand = cand_ort.run(None, {"x": x_kept})[0]
    [s] = shadows
    assert (s.tenant, s.live_model_version, s.candidate_model_version, s.compared) == (
        "app",
        "1",
        "2",
        len(x_kept),
    )
    assert s.top1_agreement == pytest.approx(
        float(np.mean(np.argmax(want_live, -1) == np.argmax(want_cand, -1)))
    )
    assert s.mean_abs_deviation == pytest.approx(float(np.mean(np.abs(want_live - want_cand))), rel=1e-5)
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
