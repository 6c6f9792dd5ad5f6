"""Every inference a model version makes counts, whatever fed it: a tenant pipeline, a gRPC Infer
call or the shadow lane, per model version and per tenant. Real onnxruntime sessions, no broker."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from agent.api import InferenceApi
from agent.observe import Observer
from agent.pipeline import Job, Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.postprocess import PostprocessSpec
from agent.preprocess import Prepared
from agent.telemetry import PipelineStats
from agent.tenants import TenantSpec
from agent.tensors import from_numpy
from controller import drift
from tests.support.model_bytes import linear_model, write_model

CONFIDENCE_EDGES = drift.CONFIDENCE_EDGES


def serve(pool: ModelPool, tenant: str, path: Path, seed: int, version: str) -> ServingModel:
    digest = write_model(path, linear_model(seed))
    serving = ServingModel(
        tenant, "m", version, digest, "onnxruntime", path, pool.load(digest, path, "onnxruntime")
    )
    pool.put(serving)
    return serving


@pytest.fixture
def pipelines(tmp_path: Path) -> Pipelines:
    """Tenant ``app`` serving m 1 (x: float32[N, 4]) with m 2 as its shadow candidate."""
    p = Pipelines(
        "dev-1", ModelPool(threads=1), 1, PipelineStats(), lambda *a: None, lambda *a: None, ResultHub()
    )
    serve(p.pool, "app", tmp_path / "live.onnx", 1, "1")
    serve(p.pool, "app.shadow", tmp_path / "cand.onnx", 2, "2")
    p.apply((TenantSpec("app", model="m", queue=16),))
    return p


def job(features: int) -> Job:
    return Job(Prepared(np.ones((1, features), np.float32), 0, 0), 0, time.perf_counter())


def by_key(models: list[fleet_pb2.ModelStats]) -> dict[tuple[str, str, str], fleet_pb2.ModelStats]:
    return {(m.tenant, m.model_name, m.model_version): m for m in models}


def counts(m: fleet_pb2.ModelStats) -> tuple[int, ...]:
    return (
        m.inference_count,
        m.error_count,
        m.pipeline_inferences,
        m.pipeline_errors,
        m.grpc_inferences,
        m.grpc_errors,
        m.shadow_inferences,
        m.shadow_errors,
    )


def test_pipeline_inferences_are_reported_in_models_under_their_version_and_tenant(
    pipelines: Pipelines,
) -> None:
    # Three prepared inputs the model takes, two of a width it refuses: every one is an inference.
    for features in (4, 5, 4, 5, 4):
        pipelines.submit("app", job(features))
    pipelines.start()
    assert pipelines.scheduler.stop(10)

    models = by_key(pipelines.inferences.models.drain())
    assert set(models) == {("app", "m", "1"), ("app.shadow", "m", "2")}
    assert counts(models["app", "m", "1"]) == (5, 2, 5, 2, 0, 0, 0, 0)
    # The candidate ran beside each successful live inference, and counts as itself.
    assert counts(models["app.shadow", "m", "2"]) == (3, 0, 0, 0, 0, 0, 3, 0)
    assert models["app", "m", "1"].latency_p50_ms > 0
    # The updater's probation reads the same counts.
    assert pipelines.inferences.models.totals("app", "m", "1") == (5, 2)
    tenants, _ = pipelines.stats.drain(*pipelines.telemetry_inputs())
    app = next(t for t in tenants if t.tenant == "app")
    assert (app.inferences, app.errors) == (3, 2)


class Aborted(Exception):
    pass


class Context:
    """The parts of a grpc.ServicerContext that Infer reads: no token, no deadline, abort()."""

    code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return []

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        self.code = code
        raise Aborted(details)


def test_grpc_calls_and_their_shadow_comparisons_count_in_the_same_place(pipelines: Pipelines) -> None:
    api = InferenceApi(
        pipelines.pool,
        pipelines.inferences,
        lambda: True,
        run=pipelines.call,
        shadow=pipelines.offer_shadow,
    )
    pipelines.start()
    codes = []
    for features in (4, 4, 5):
        request = inference_pb2.InferRequest(
            tenant="app", inputs={"x": from_numpy(np.ones((2, features), np.float32), "x")}
        )
        context = Context()
        with contextlib.suppress(Aborted):
            api.Infer(request, context)
        codes.append(context.code)
    assert codes == [None, None, grpc.StatusCode.INVALID_ARGUMENT]
    pipelines.submit("app", job(4))
    assert pipelines.scheduler.stop(10)

    models = by_key(pipelines.inferences.models.drain())
    assert counts(models["app", "m", "1"]) == (4, 1, 1, 0, 3, 1, 0, 0)
    assert counts(models["app.shadow", "m", "2"]) == (3, 0, 0, 0, 0, 0, 3, 0)
    tenants, _ = pipelines.stats.drain(*pipelines.telemetry_inputs())
    app = next(t for t in tenants if t.tenant == "app")
    assert (app.inferences, app.errors) == (3, 1)


def test_a_post_processed_tenant_is_sketched_on_the_scores_its_consumers_get(tmp_path: Path) -> None:
    """The confidence gate reads the sketches' confidence: for a tenant whose results are
    post-processed (here a sigmoid over the scores), that is the post-processed top score."""
    spec = fleet_pb2.DriftSpec(
        tenant="app", model_name="m", model_version="1", num_classes=3, confidence_edges=CONFIDENCE_EDGES
    )
    for i in range(4):
        spec.features.add(name=f"f{i}", edges=[0.0])
    observer = Observer("dev-1")
    observer.configure(fleet_pb2.DesiredState(drift_specs=[spec]))
    p = Pipelines(
        "dev-1",
        ModelPool(threads=1),
        1,
        PipelineStats(),
        lambda *a: None,
        lambda *a: None,
        ResultHub(),
        observer,
    )
    live = serve(p.pool, "app", tmp_path / "live.onnx", 1, "1")
    post = PostprocessSpec(kind="classes", activation="sigmoid", top_k=1)
    # Nobody subscribes to the results: the sketch alone needs the post-processed scores.
    p.apply((TenantSpec("app", model="m", queue=16, postprocess=post),))
    x = np.random.default_rng(0).normal(0, 2, size=(12, 4)).astype(np.float32)
    for row in x:
        p.submit("app", Job(Prepared(row[None], 0, 0), 0, time.perf_counter()))
    p.start()
    assert p.scheduler.stop(10)

    scores = live.model.run({"x": x})["y"].astype(np.float64)
    sigmoid = 1 / (1 + np.exp(-scores))
    softmax = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    want = drift.histogram(sigmoid.max(axis=1), CONFIDENCE_EDGES)
    assert want != drift.histogram(softmax.max(axis=1), CONFIDENCE_EDGES), "the test must tell them apart"
    (sketch,) = observer.drain_sketches()
    assert tuple(sketch.confidence.counts) == want
    assert list(sketch.class_counts) == np.bincount(scores.argmax(axis=1), minlength=3).tolist()
