"""fp32 vs static int8 (QDQ) vs dynamic int8 (and fp16) for conv models, on this CPU, in one run.

Builds ``tests.support.models.small_conv`` (the conv model of the tests, 2 layers of 8 and
16 channels) and ``tests.support.models.conv_net`` (3 layers, 32-64-128 channels, 64x64
input; ``--width``/``--size``), each fp32 being the raw baseline; quantizes them the way
the controller does on upload (:func:`controller.optimize.quantize`, per-channel
weights, calibrated on the same inputs it is then measured on) and measures, one
single-threaded onnxruntime session each, interleaved round by round so a noisy
neighbour slows every variant alike:

- latency p50 and p99 of one image, and the ratio variant p50 / fp32 p50;
- file size and the ratio variant / fp32;
- top-1 agreement with fp32 on the validation images, and the max |deviation| of the logits.

Run: ``.venv/bin/python bench/quantization.py [--iterations 2000] [--images 256]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.optimize import Runner, quantize, validate
from controller.registry import DYNAMIC_INT8, FP16, STATIC_INT8
from tests.support.models import conv_net, small_conv


def measure(label: str, fp32: Path, images: np.ndarray, iterations: int, work: Path) -> None:
    files = {"fp32": fp32}
    for kind in (STATIC_INT8, DYNAMIC_INT8, FP16):
        files[kind] = work / f"{fp32.stem}-{kind}.onnx"
        quantize(kind, fp32, files[kind], {"image": images}, per_channel=True)
    runners = {name: Runner(path, "onnx") for name, path in files.items()}
    samples = [[images[i : i + 1]] for i in range(len(images))]
    reference = runners["fp32"].run_all(samples)

    sample = samples[0]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(max(10, iterations // 20)):
        for runner in runners.values():
            runner.run(sample)
    for _ in range(iterations):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(sample)
            times[name].append((time.perf_counter() - start) * 1000)

    base_p50 = float(np.percentile(times["fp32"], 50))
    base_size = fp32.stat().st_size
    print(f"\n{label}: {iterations} runs each (interleaved), {len(images)} validation images, 1 thread")
    print(
        f"{'variant':<20}{'p50 ms':>9}{'p99 ms':>9}{'p50/fp32':>10}{'bytes':>10}{'size/fp32':>11}"
        f"{'top-1 agree':>13}{'max |dev|':>11}"
    )
    for name, runner in runners.items():
        p50, p99 = np.percentile(times[name], [50, 99])
        size = files[name].stat().st_size
        check = validate(reference, runner.run_all(samples), "classifier", 0.99)
        print(
            f"{name:<20}{p50:>9.4f}{p99:>9.4f}{p50 / base_p50:>10.2f}{size:>10}{size / base_size:>11.2f}"
            f"{check.report['top1_agreement']:>13.2%}{check.report.get('max_abs_deviation', 0.0):>11.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = rng.standard_normal((args.images, 3, 32, 32)).astype(np.float32)
        measure("small_conv 1x3x32x32", small_conv(work / "small.onnx"), small, args.iterations, work)
        wide = rng.standard_normal((args.images, 3, args.size, args.size)).astype(np.float32)
        net = conv_net(work / "wide.onnx", args.width, args.size)
        measure(
            f"conv_net width {args.width} 1x3x{args.size}x{args.size}", net, wide, args.iterations // 4, work
        )


if __name__ == "__main__":
    main()
