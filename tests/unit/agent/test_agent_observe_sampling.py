"""The closed loop off the inference thread: batches sketched like single inferences, and sampling
at high rates that keeps the window's histograms unbiased (fake clock and seeded randomness)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from agent import observe
from agent.observe import Observer

EDGES = [0.2, 0.4, 0.6, 0.8]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def desired(random_fraction: float = 0.0) -> fleet_pb2.DesiredState:
    spec = fleet_pb2.DriftSpec(
        tenant="t", model_name="m", model_version="1", num_classes=3, confidence_edges=[0.5, 0.75]
    )
    spec.features.add(name="f0", edges=EDGES)
    spec.features.add(name="f1", edges=EDGES)
    policies = []
    if random_fraction:
        policies.append(
            fleet_pb2.CapturePolicy(
                tenant="t",
                model_name="m",
                policy_id="p",
                random_fraction=random_fraction,
                max_samples_per_upload=0,
            )
        )
    return fleet_pb2.DesiredState(drift_specs=[spec], capture_policies=policies)


def stream(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.beta(2.0, 5.0, size=(n, 2)).astype(np.float32)
    probs = rng.dirichlet([1.0, 2.0, 4.0], size=n).astype(np.float32)
    return rows, probs


def feed(observer: Observer, clock: Clock, rows: np.ndarray, probs: np.ndarray, period_s: float) -> None:
    for row, p in zip(rows, probs, strict=True):
        clock.now += period_s
        observer.observe("t", "m", "1", row[None], {"probabilities": p[None]}, scores="probabilities")


def test_batched_sketch_equals_one_inference_at_a_time() -> None:
    rows, probs = stream(300)
    clock = Clock()
    whole = Observer("d", clock=clock)
    whole.configure(desired())
    with whole._processing:  # all 300 wait, and are taken in as one batch
        feed(whole, clock, rows, probs, period_s=0.1)  # 10 a second: every one sketched
    reference = Observer("d")
    reference.configure(desired())
    for row, p in zip(rows, probs, strict=True):
        reference.sketcher.observe("t", "m", "1", row[None], p[None])
    assert whole.drain_sketches() == reference.sketcher.drain()


def test_a_bad_inference_in_a_batch_fails_alone_and_logits_are_softmaxed_as_one_at_a_time() -> None:
    rows, _ = stream(40)
    logits = np.random.default_rng(5).normal(0.0, 3.0, size=(40, 3)).astype(np.float32)
    clock = Clock()
    observer = Observer("d", clock=clock)
    observer.configure(desired(random_fraction=1.0))
    with observer._processing:
        for i, (row, y) in enumerate(zip(rows, logits, strict=True)):
            clock.now += 0.1
            # The 20th answers two rows for its one input row: it alone cannot be sketched.
            out = np.vstack([y, y]) if i == 19 else y[None]
            observer.observe("t", "m", "1", row[None], {"y": out}, scores="y")
    reference = Observer("d", clock=Clock())
    reference.configure(desired())
    for i, (row, y) in enumerate(zip(rows, logits, strict=True)):
        if i != 19:
            reference.observe("t", "m", "1", row[None], {"y": y[None]}, scores="y")
    assert observer.drain_sketches() == reference.drain_sketches()
    assert observer.failures == 1
    (upload,) = observer.uploads(final=True)
    assert upload[0].samples == 39  # the one that failed is not captured either


def test_a_high_rate_is_sampled_and_each_sample_counts_for_the_inferences_not_drawn() -> None:
    n = 40_000
    rows, probs = stream(n, seed=1)
    clock = Clock()
    observer = Observer("d", rng=random.Random(7), clock=clock, sample_above_hz=250.0)
    observer.configure(desired())
    sketched: list[int] = []
    offer = observer.offer

    def counting_offer(*args: object, **kwargs: object) -> None:
        sketched.append(1)
        offer(*args, **kwargs)  # type: ignore[arg-type]

    observer.offer = counting_offer  # type: ignore[method-assign]
    feed(observer, clock, rows, probs, period_s=1e-4)  # 10,000 inferences a second, for 4 s
    (sketch,) = observer.drain_sketches()

    # About 250 a second were sketched, not 10,000 ...
    assert 700 < len(sketched) < 1_500, len(sketched)
    # ... and the window still stands for every inference: one drawn in each block of 40 (the
    # stride at this rate) counts 40, so the total is off by less than a block.
    assert abs(sketch.samples - n) < 40, sketch.samples
    full = Observer("d")
    full.configure(desired())
    for row, p in zip(rows, probs, strict=True):
        full.sketcher.observe("t", "m", "1", row[None], p[None])
    (truth,) = full.sketcher.drain()
    for got, want in zip(sketch.features, truth.features, strict=True):
        share, true_share = np.array(got.counts) / sum(got.counts), np.array(want.counts) / sum(want.counts)
        assert np.abs(share - true_share).max() < 0.05, (got.name, share, true_share)
    classes = np.array(sketch.class_counts) / sum(sketch.class_counts)
    true_classes = np.array(truth.class_counts) / sum(truth.class_counts)
    assert np.abs(classes - true_classes).max() < 0.05


def test_sampled_inferences_keep_the_capture_policy_share_of_random_samples() -> None:
    n = 20_000
    rows, probs = stream(n, seed=2)
    clock = Clock()
    observer = Observer("d", rng=random.Random(3), clock=clock, sample_above_hz=250.0)
    observer.captures.clock = clock
    observer.configure(desired(random_fraction=0.01))
    feed(observer, clock, rows, probs, period_s=1e-4)
    kept = sum(chunks[0].samples for chunks in observer.uploads(final=True))
    assert 0.6 * n * 0.01 < kept < 1.4 * n * 0.01, kept


def test_a_full_queue_turns_inferences_away_and_the_next_one_carries_their_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(observe, "MAX_PENDING", 8)
    rows, probs = stream(21)
    clock = Clock()
    observer = Observer("d", clock=clock)
    observer.configure(desired())
    with observer._processing:  # the sketching thread is stuck (starved of CPU, say)
        feed(observer, clock, rows[:20], probs[:20], period_s=0.1)
    observer.process()  # it catches up
    feed(observer, clock, rows[20:], probs[20:], period_s=0.1)
    (sketch,) = observer.drain_sketches()
    assert sketch.samples == 21
    assert sum(sketch.features[0].counts) == 21
