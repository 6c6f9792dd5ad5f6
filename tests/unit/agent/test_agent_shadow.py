from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from agent.pipeline import Job, Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.preprocess import Prepared
from agent.shadow import compare
from agent.signature import InputRole, ModelSignature, OutputMeaning
from agent.telemetry import PipelineStats
from agent.tenants import TenantSpec
from tests.support.models import scores_beside_features


def test_classifier_scores_give_top1_agreement() -> None:
    live = {"logits": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)}
    cand = {"logits": np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9], [0.7, 0.3]], np.float32)}
    c = compare(live, cand, scores="logits")
    assert c.top1 == pytest.approx(0.75)
    assert c.mean_abs_deviation == pytest.approx(np.mean(np.abs(live["logits"] - cand["logits"])))


def test_labels_and_regression_outputs() -> None:
    c = compare({"label": np.array([1, 2, 3])}, {"label": np.array([1, 2, 4])}, scores="label")
    assert c.top1 == pytest.approx(2 / 3)
    r = compare({"y": np.array([[1.0]])}, {"y": np.array([[1.5]])}, scores="y")
    assert r.top1 is None and r.mean_abs_deviation == pytest.approx(0.5)


def test_outputs_that_do_not_match_are_an_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        compare({"y": np.zeros((1, 2))}, {"z": np.zeros((1, 2))})


def test_a_comparison_covers_the_rows_of_its_batch() -> None:
    scores = np.zeros((5, 3), np.float32)
    assert compare({"s": scores}, {"s": scores}).rows == 5
    assert compare({"label": np.array([1, 2])}, {"label": np.array([1, 3])}).rows == 2
    assert compare({"y": np.float32(1.0)}, {"y": np.float32(2.0)}).rows == 1
    unbatched = np.zeros(3, np.float32)  # the scores of one sample, without a batch axis
    assert compare({"s": unbatched}, {"s": unbatched}).rows == 1


def test_top1_agreement_is_read_on_the_output_the_signature_calls_scores() -> None:
    features = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
    live = {"features": features, "logits": logits}
    cand = {"features": features[:, ::-1].copy(), "logits": logits + 0.1}  # features flip, classes hold
    assert compare(live, cand, scores="logits").top1 == 1.0
    assert compare(live, cand).top1 is None  # no scores output named: no output is guessed


def test_a_pipelines_shadow_agreement_reads_the_signatures_scores(tmp_path: Path) -> None:
    """Real pipelines and onnxruntime: live and candidate agree on every class and differ in
    the features they output first; the shadow figure is the classes' agreement."""
    live_path = scores_beside_features(tmp_path / "live.onnx", scores_first=False)
    cand_path = scores_beside_features(tmp_path / "cand.onnx", features_seed=9, scores_first=False)
    # What the controller infers for this model (its own tests check that); written out here so
    # the agent's tests need no controller (they also run on Python 3.10).
    signature = ModelSignature(
        inputs=(InputRole("x", "source", "NC", 0, "float32", (-1, 4)),),
        outputs=(
            OutputMeaning("features", "", "float32", (-1, 8)),
            OutputMeaning("logits", "scores", "float32", (-1, 3)),
        ),
    )
    p = Pipelines(
        "dev-1", ModelPool(threads=1), 1, PipelineStats(), lambda *a: None, lambda *a: None, ResultHub()
    )
    for tenant, path, version in (("app", live_path, "1"), ("app.shadow", cand_path, "2")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        model = p.pool.load(digest, path, "onnxruntime")
        p.pool.put(ServingModel(tenant, "m", version, digest, "onnxruntime", path, model, signature))
    p.apply((TenantSpec("app", model="m", queue=64),))
    rows = np.random.default_rng(4).normal(size=(20, 4)).astype(np.float32)
    for i, row in enumerate(rows):
        p.submit("app", Job(Prepared(row[None], i, 0), 0, time.perf_counter()))
    p.start()
    assert p.scheduler.stop(10)
    _, shadows = p.stats.drain(*p.telemetry_inputs())
    (shadow,) = shadows
    assert shadow.compared == 20 and shadow.top1_agreement == 1.0
