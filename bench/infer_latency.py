"""gRPC Infer round trip on a real agent, beside raw onnxruntime and an empty gRPC call.

Starts mosquitto, the controller and one agent, rolls out each model and then
measures, in the same run and on the same machine:

- ``raw``: onnxruntime ``session.run`` in this process on the same input;
- ``empty``: the agent's ``Health`` call over the same Unix socket (gRPC floor);
- ``infer``: the agent's ``Infer`` call.

Prints medians (p50) and p99 of each and the ratios infer/raw and infer/empty.
Run: ``.venv/bin/python bench/infer_latency.py [--iterations 2000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import inference_pb2, inference_pb2_grpc

from tests.broker import Broker
from tests.localfleet import Controller, register_agent, rollout_done, to_tensors, wait_until
from tests.models import digits_classifier, small_conv


def timed(call: Callable[[], object], iterations: int) -> np.ndarray:
    for _ in range(max(20, iterations // 20)):
        call()
    samples = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        call()
        samples[i] = time.perf_counter() - start
    return samples * 1000.0


def row(name: str, ms: np.ndarray) -> str:
    return f"{name:<28} p50 {np.percentile(ms, 50):8.3f} ms   p99 {np.percentile(ms, 99):8.3f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    broker = Broker(work / "mosquitto").start()
    controller = Controller(
        work / "controller", broker.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    controller.init()
    controller.start()
    agent = register_agent(controller, work / "agents", "bench-1", telemetry_interval=10.0).start()
    try:
        digits = digits_classifier(work / "digits.onnx")
        conv = small_conv(work / "conv.onnx")
        cases = [
            ("digits", digits.path, {"X": digits.samples[:1]}),
            (
                "conv",
                conv,
                {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)},
            ),
        ]
        print(f"# {args.iterations} calls each, batch 1, after warm-up; machine shared, quote medians")
        for name, path, inputs in cases:
            controller.cli("models", "upload", str(path), "--name", name, "--version", "1")
            rollout = controller.cli(
                "rollouts", "create", "--model", name, "--version", "1", "--device", "bench-1"
            )
            final = wait_until(lambda r=rollout: rollout_done(controller, r["id"]), 60, f"{name} rollout")
            assert final["status"] == "succeeded", final

            options = ort.SessionOptions()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            raw = timed(lambda s=session, i=inputs: s.run(None, i), args.iterations)
            with agent.channel() as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.InferRequest(inputs=to_tensors(inputs))
                health = inference_pb2.HealthRequest()
                empty = timed(lambda s=stub, h=health: s.Health(h), args.iterations)
                infer = timed(lambda s=stub, r=request: s.Infer(r), args.iterations)
            p50 = {
                k: float(np.percentile(v, 50)) for k, v in (("raw", raw), ("empty", empty), ("infer", infer))
            }
            print(f"\n## {name} ({path.stat().st_size} bytes)")
            print(row("raw onnxruntime run", raw))
            print(row("empty gRPC call (Health)", empty))
            print(row("gRPC Infer", infer))
            print(
                f"ratio infer/raw p50 {p50['infer'] / p50['raw']:.2f}x   "
                f"infer/empty p50 {p50['infer'] / p50['empty']:.2f}x   "
                f"overhead over raw p50 {p50['infer'] - p50['raw']:.3f} ms"
            )
    finally:
        agent.stop()
        controller.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
