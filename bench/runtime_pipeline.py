"""The in-process tenant pipeline against raw onnxruntime, measured in the same run.

(a) overhead per inference: one job at a time through the fair scheduler, the
    pooled model and the result hub (submit -> result in a StreamResults
    subscription), beside ``session.run`` on the same input and the same thread
    count (one intra-op thread, one worker); then closed loop off and on (a drift
    spec and a capture policy for the tenant, agent.observe), interleaved round by
    round: p50 and mean latency, and the process's CPU time per inference (the
    sketching thread included, its queue drained at the end); then what the closed
    loop costs the inference thread (admit and queue) and the sketching thread
    (per inference it sketches, in batches);
(b) three saturating tenants (synthetic camera sources, weights 1:2:4, one
    shared wider conv model) for a few seconds: total inferences per second beside the best
    raw single-session throughput, and the CPU-time share each tenant got
    against its weight.

Run: ``.venv/bin/python bench/runtime_pipeline.py [--iterations 2000] [--rounds 3] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import fleet_pb2

from agent.observe import BATCH, SAMPLE_ABOVE_HZ, Observer
from agent.pipeline import Job, Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.preprocess import Prepared
from agent.signature import SCORES, InputRole, ModelSignature, OutputMeaning
from agent.telemetry import PipelineStats
from agent.tenants import PreprocessSpec, SourceSpec, TenantSpec
from tests.support.models import small_conv, wide_conv

# Both test convs: an NCHW image in, class logits out (what the sketch reads as the scores).
SIGNATURE = ModelSignature(
    inputs=(InputRole("image", layout="NCHW", batch_axis=0),), outputs=(OutputMeaning("logits", SCORES),)
)


def pipelines(
    model: Path, tenants: dict[str, float], workers: int, threads: int, observer: Observer | None = None
) -> tuple[Pipelines, ResultHub]:
    pool = ModelPool(threads=threads)
    loaded = pool.load("c" * 64, model, "onnxruntime")
    for tenant in tenants:
        pool.put(ServingModel(tenant, "conv", "1", "c" * 64, "onnxruntime", model, loaded, SIGNATURE))
    hub = ResultHub()
    p = Pipelines("bench", pool, workers, PipelineStats(), lambda *a: None, lambda t, b: None, hub, observer)
    p.start()
    return p, hub


def overhead(model: Path, iterations: int, rounds: int) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    raw, off, on = [], [], []
    cpu_off, cpu_on = [], []
    loop = closed_loop()
    for _ in range(rounds):
        raw.append(raw_runs(session, x, iterations))
        took, cpu = through_pipeline(model, x, iterations, None)
        off.append(took)
        cpu_off.append(cpu)
        took, cpu = through_pipeline(model, x, iterations, loop)
        on.append(took)
        cpu_on.append(cpu)
    r, piped, looped = np.concatenate(raw) * 1e6, np.concatenate(off) * 1e6, np.concatenate(on) * 1e6
    r50, p50, l50 = np.median(r), np.median(piped), np.median(looped)
    c_off, c_on = np.median(cpu_off) * 1e6, np.median(cpu_on) * 1e6
    print(
        f"(a) one inference, small conv 1x3x32x32, 1 intra-op thread, 1 worker, {rounds} x {iterations} each"
    )
    print(
        f"    raw session.run          p50 {r50:7.1f} us                  p99 {np.percentile(r, 99):7.1f} us"
    )
    print(
        f"    pipeline (sched+hub)     p50 {p50:7.1f} us   mean {piped.mean():7.1f} us   "
        f"p99 {np.percentile(piped, 99):7.1f} us"
    )
    print(f"    pipeline over raw        p50 {p50 - r50:+7.1f} us   ratio {p50 / r50:.2f}x")
    print(
        f"    closed loop on           p50 {l50:7.1f} us   mean {looped.mean():7.1f} us   "
        f"p99 {np.percentile(looped, 99):7.1f} us"
    )
    print(
        f"    closed loop on - off     p50 {l50 - p50:+7.1f} us   mean {looped.mean() - piped.mean():+7.1f} us   "
        f"cpu {c_on - c_off:+7.1f} us per inference (cpu off {c_off:.1f}, on {c_on:.1f})"
    )
    sketched = loop.sketcher.drain()
    counted = sum(s.samples for s in sketched)
    print(f"    the sketches stand for {counted} inferences of the {rounds * (iterations + 100)} run")
    logits = session.run(None, {"image": x})[0]
    unsampled = 1e12  # inferences a second: never sampled
    image = observe_cost(closed_loop(0, unsampled), "conv", x, {"logits": logits}, iterations)
    row = np.random.default_rng(1).random((1, 64), dtype=np.float32) * 16
    probs = np.full((1, 10), 0.1, np.float32)
    tabular = observe_cost(closed_loop(64, unsampled), "tab", row, {"probabilities": probs}, iterations)
    print(
        f"    closed loop, inference thread (admit + queue)  p50 {image[0]:6.2f} us (1x3x32x32 image)   "
        f"{tabular[0]:6.2f} us (1x64 row)"
    )
    print(
        f"    closed loop, sketching thread per inference   p50 {image[1]:6.2f} us (batches of {BATCH - 1})      "
        f"{tabular[1]:6.2f} us"
    )


def raw_runs(session: ort.InferenceSession, x: np.ndarray, iterations: int) -> np.ndarray:
    took = np.empty(iterations)
    for i in range(-100, iterations):
        start = time.perf_counter()
        session.run(None, {"image": x})
        if i >= 0:
            took[i] = time.perf_counter() - start
    return took


def observe_cost(
    observer: Observer, model: str, x: np.ndarray, outputs: dict[str, np.ndarray], iterations: int
) -> tuple[float, float]:
    """Per inference, unsampled: the inference thread's share (admit + offer) and the sketching
    thread's (one batch of BATCH - 1, taken in here before the thread's gathering wait ends)."""
    front, back = [], []
    for _ in range(max(1, iterations // BATCH)):
        start = time.perf_counter()
        for _ in range(BATCH - 1):
            weight = observer.admit("t", model, "1")
            observer.offer("t", model, "1", x, outputs, "", None, weight, next(iter(outputs)))
        front.append((time.perf_counter() - start) / (BATCH - 1))
        start = time.perf_counter()
        observer.process()
        back.append((time.perf_counter() - start) / (BATCH - 1))
    return float(np.median(front) * 1e6), float(np.median(back) * 1e6)


def closed_loop(features: int = 0, sample_above_hz: float = SAMPLE_ABOVE_HZ) -> Observer:
    """A drift spec (per-channel means, or ``features`` columns; confidence) and a capture policy."""
    model = "tab" if features else "conv"
    spec = fleet_pb2.DriftSpec(
        tenant="t", model_name=model, model_version="1", num_classes=10, confidence_edges=[0.2, 0.4, 0.6, 0.8]
    )
    for c in range(features or 3):
        spec.features.add(name=f"f{c}" if features else f"ch{c}", edges=[0.1 * i for i in range(1, 10)])
    policy = fleet_pb2.CapturePolicy(
        tenant="t", model_name=model, policy_id="bench", random_fraction=0.01, max_samples_per_upload=200
    )
    observer = Observer("bench", sample_above_hz=sample_above_hz)
    observer.configure(fleet_pb2.DesiredState(drift_specs=[spec], capture_policies=[policy]))
    return observer


def through_pipeline(
    model: Path, x: np.ndarray, iterations: int, observer: Observer | None
) -> tuple[np.ndarray, float]:
    """Latency of each inference, and the process's CPU seconds per inference (the closed
    loop's queue drained before the clock stops)."""
    p, hub = pipelines(model, {"t": 1.0}, workers=1, threads=1, observer=observer)
    p.apply((TenantSpec("t", results=frozenset({"grpc"})),))
    results = hub.subscribe("t")
    piped = np.empty(iterations)
    for i in range(-100, iterations):
        if i == 0:
            cpu = time.process_time()
        start = time.perf_counter()
        p.submit("t", Job(Prepared(x, i + 100, 0), 1, start))
        results.get(timeout=10)
        if i >= 0:
            piped[i] = time.perf_counter() - start
    if observer is not None:
        observer.process()
    cpu = time.process_time() - cpu
    p.stop(5)
    return piped, cpu / iterations


def saturated(model: Path, size: int, seconds: float) -> None:
    cores = os.cpu_count() or 1
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    best = 0.0
    for threads in sorted({1, cores}):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        count, end = 0, time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            session.run(None, {"image": x})
            count += 1
        best = max(best, count / (seconds / 2))

    weights = {"low": 1.0, "mid": 2.0, "high": 4.0}
    p, _hub = pipelines(model, weights, workers=cores, threads=1)
    specs = tuple(
        TenantSpec(
            t,
            source=SourceSpec("synthetic", "", {"shape": f"{size},{size},3", "seed": str(i)}),
            preprocess=PreprocessSpec(scale=1 / 255, layout="nchw"),
            weight=w,
            # Live sources deliver at their own pace; each alone offers twice the raw capacity.
            rate_hz=2 * best,
            queue=4,
            results=frozenset({"grpc"}),
        )
        for i, (t, w) in enumerate(weights.items())
    )
    p.apply(specs)
    time.sleep(1.0)
    p.telemetry_inputs()
    p.stats.drain({}, {})
    time.sleep(seconds)
    weights_now, busy = p.telemetry_inputs()
    stats, _ = p.stats.drain(weights_now, busy)
    p.stop(5)
    total = sum(s.inferences for s in stats) / seconds
    total_busy = sum(busy.values())
    print(
        f"(b) three tenants on one {size}x{size} conv, each offered {2 * best:.0f}/s (2x what raw does), "
        f"{cores} workers x 1 thread, {seconds:.0f} s"
    )
    print(f"    raw best single session  {best:9.0f} inferences/s")
    print(f"    pipeline, all tenants    {total:9.0f} inferences/s   ratio {total / best:.2f}")
    for s in stats:
        share, want = busy[s.tenant] / total_busy, weights[s.tenant] / sum(weights.values())
        print(
            f"    {s.tenant:5s} weight {s.weight:.0f}: cpu share {share:6.1%} (weight share {want:6.1%}, "
            f"off {abs(share - want) / want:5.1%}), {s.inferences / seconds:7.0f}/s, dropped {s.dropped}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of raw, loop off, loop on")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64, help="image side of the saturating tenants' model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = small_conv(Path(tmp) / "conv.onnx")
        overhead(model, args.iterations, args.rounds)
        saturated(wide_conv(Path(tmp) / "wide.onnx", args.size), args.size, args.seconds)


if __name__ == "__main__":
    main()
