"""Real third-party models on a real agent: the tenant pipeline and gRPC Infer beside the file run
directly, in the same run on the same machine.

Starts mosquitto, the controller and one agent (no device profile, so it gets each model's
uploaded file), and for each model of the corpus (tests.support.realmodels: MediaPipe face detection and
selfie segmentation in LiteRT, silero-vad, RapidOCR's text detector and direction classifier in
onnxruntime) uploads it with sample inputs, rolls it out to a tenant fed by media made here (a
video written by OpenCV, a WAV for silero-vad with its state carried) and measures:

- ``direct``: the same file in LiteRT / onnxruntime in this process, with the agent's intra-op
  threads (cores // workers), on the input the tenant prepares;
- ``pipeline``: each result's ``latency_ms`` as the tenant publishes it, from capture to result
  (decode, preprocessing, the scheduler, inference, post-processing); the source is paced well
  under capacity, so no result waited behind another;
- ``grpc``: the tenant's ``Infer`` call over the agent's Unix socket with the same input.

Prints p50 (and p90) of each and the ratios pipeline/direct and grpc/direct. Medians: the
machine may be shared. Run: ``.venv/bin/python bench/real_models.py [--results 60] [--calls 200]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.preprocess import letterbox
from agent.tensors import from_arrays
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.media import face_frame, silence, speech_like, text_frame, write_video, write_wav
from tests.support.realmodels import ModelCorpus, sample_inputs
from tests.support.waiting import wait_until

TOKEN = "bench-tenant-token-0123456789"
METADATA = [("x-edgefleet-token", TOKEN)]
OCR_MEAN, OCR_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WINDOW, HOP, RATE = 576, 512, 16000
# The agent's default scheduler on this machine: one worker per core, one intra-op thread each.
THREADS = 1


@dataclass
class Case:
    corpus: str
    name: str
    sensor: str
    tenant: dict[str, Any]
    # The inputs of one inference as the tenant prepares them (state and constants included).
    feed: dict[str, np.ndarray]


def image_tenant(
    name: str, uri: Path, preprocess: dict[str, Any], postprocess: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": name,
        "model": name,
        "source": {"kind": "video", "uri": str(uri), "options": {"loop": True}},
        "preprocess": preprocess,
        "postprocess": postprocess,
        "rate_hz": 10,
        "queue": 4,
        "results": ["grpc"],
        "token": TOKEN,
    }


def nchw(frame: np.ndarray, size: tuple[int, int], mean: list[float], std: list[float]) -> np.ndarray:
    import cv2

    rgb = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    x: np.ndarray = (rgb.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def cases(work: Path) -> list[Case]:
    import cv2

    faces = write_video(
        work / "faces.avi", [face_frame(320, 240, f) for f in ((200, 110, 60), (90, 140, 50))]
    )
    boxed, _ = letterbox(faces[0], 128, 128)
    texts = write_video(work / "texts.avi", [text_frame(320, 240, "EDGE FLEET", (40, 140), 1.4)[0]] * 2)
    lines = write_video(work / "lines.avi", [text_frame(192, 48, "EDGE FLEET 42", (6, 36), 1.2)[0]] * 2)
    audio = write_wav(work / "speech.wav", np.concatenate([speech_like(1.5), silence(1.5)]))
    selfie = cv2.resize(faces[0], (256, 256), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    return [
        Case(
            "face_detection_short_range", "face", "camera",
            image_tenant("face", work / "faces.avi",
                         {"resize": [128, 128], "fit": "letterbox", "color": "rgb", "scale": 1 / 127.5, "mean": [1.0]},
                         {"kind": "ssd", "output": "classificators", "boxes_output": "regressors",
                          "strides": [8, 16, 16, 16], "threshold": 0.5, "labels": ["face"]}),
            {"input": (boxed[:, :, ::-1].astype(np.float64) / 127.5 - 1.0)[None].astype(np.float32)},
        ),
        Case(
            "selfie_segmentation", "selfie", "camera",
            image_tenant("selfie", work / "faces.avi", {"resize": [256, 256], "color": "rgb", "scale": 1 / 255},
                         {"kind": "mask", "threshold": 0.5}),
            {"input_1": (selfie.astype(np.float64) / 255)[None].astype(np.float32)},
        ),
        Case(
            "silero_vad", "vad", "microphone",
            {
                "id": "vad", "model": "vad",
                "source": {"kind": "wav", "uri": str(work / "speech.wav"), "options": {"chunk": HOP, "loop": True}},
                "preprocess": {"window": WINDOW, "hop": HOP},
                "inputs": {"sr": {"role": "constant", "value": RATE, "dtype": "int64"},
                           "state": {"role": "state", "from": "stateN", "shape": [2, 1, 128], "value": 0.0}},
                "postprocess": {"kind": "threshold", "output": "output", "threshold": 0.1, "labels": ["speech"]},
                "rate_hz": 31.25, "queue": 4, "results": ["grpc"], "token": TOKEN,
            },
            {"input": audio[:WINDOW][None].astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
             "sr": np.array(RATE, np.int64)},
        ),
        Case(
            "ppocr_det", "textdet", "camera",
            image_tenant("textdet", work / "texts.avi",
                         {"resize": [192, 256], "color": "rgb", "scale": 1 / 255, "mean": OCR_MEAN, "std": OCR_STD,
                          "layout": "nchw"},
                         {"kind": "mask", "threshold": 0.3}),
            {"x": nchw(texts[0], (192, 256), OCR_MEAN, OCR_STD)},
        ),
        Case(
            "ppocr_cls", "textdir", "camera",
            image_tenant("textdir", work / "lines.avi",
                         {"resize": [48, 192], "color": "rgb", "scale": 1 / 255, "mean": [0.5], "std": [0.5],
                          "layout": "nchw"},
                         {"kind": "classes", "top_k": 1, "labels": ["0", "180"]}),
            {"x": nchw(lines[0], (48, 192), [0.5], [0.5])},
        ),
    ]  # fmt: skip


def direct_runner(path: Path) -> Callable[[dict[str, np.ndarray]], object]:
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
        interpreter.allocate_tensors()
        inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
        outputs = [d["index"] for d in interpreter.get_output_details()]

        def run_tflite(feed: dict[str, np.ndarray]) -> object:
            for name, value in feed.items():
                interpreter.set_tensor(inputs[name], value)
            interpreter.invoke()
            return [interpreter.get_tensor(i) for i in outputs]

        return run_tflite
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def interleaved(
    first: Callable[[], object], second: Callable[[], object], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each call timed in turn (ABAB...), so both see the same machine; after a warm-up."""
    for _ in range(max(10, count // 10)):
        first()
        second()
    out = np.empty((2, count))
    for i in range(count):
        for j, call in enumerate((first, second)):
            start = time.perf_counter()
            call()
            out[j, i] = time.perf_counter() - start
    return out[0] * 1000.0, out[1] * 1000.0


def paced(call: Callable[[], object], rate_hz: float, until: threading.Event) -> np.ndarray:
    """``call`` timed at the tenant's pace until ``until`` is set: the direct run beside the pipeline."""
    out = []
    while not until.is_set():
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
        until.wait(max(0.0, 1 / rate_hz - (time.perf_counter() - start)))
    return np.array(out) * 1000.0


def pipeline_latencies(
    agent: AgentProcess, tenant: str, count: int, on_first: Callable[[], None]
) -> np.ndarray:
    """``latency_ms`` of ``count`` results after the first few (model loading, first frames). The
    stream is opened again while the agent does not know the tenant yet (it was just declared)."""
    got: queue.Queue[float] = queue.Queue()
    stop = threading.Event()
    refused: list[str] = []

    def read() -> None:
        with agent.channel() as channel:
            stub = inference_pb2_grpc.TenantResultsStub(channel)
            while not stop.is_set():
                call = stub.StreamResults(
                    inference_pb2.StreamResultsRequest(tenant=tenant), metadata=METADATA
                )
                try:
                    for result in call:
                        got.put(result.latency_ms)
                        if stop.is_set():
                            call.cancel()
                except grpc.RpcError as exc:
                    refused[:] = [f"{exc.code()}: {exc.details()}"]
                stop.wait(0.2)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    values: list[float] = []
    deadline = time.monotonic() + 120 + count
    while len(values) < count + 5 and time.monotonic() < deadline:
        try:
            values.append(got.get(timeout=1))
            if len(values) == 5:
                on_first()
        except queue.Empty:
            continue
    stop.set()
    if len(values) < count + 5:
        raise TimeoutError(f"tenant {tenant}: {len(values)} results in time, wanted {count + 5}; {refused}")
    return np.array(values[5:], dtype=np.float64)


def row(label: str, ms: np.ndarray) -> str:
    return f"    {label:<34} p50 {np.percentile(ms, 50):8.3f} ms   p90 {np.percentile(ms, 90):8.3f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=int, default=60, help="tenant results per model")
    parser.add_argument("--calls", type=int, default=200, help="gRPC calls and direct runs per model")
    args = parser.parse_args()
    corpus = ModelCorpus()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-real-"))
    broker = Broker(work / "mosquitto").start()
    controller = Controller(
        work / "controller", broker.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    controller.init()
    controller.start()
    agent = register_agent(controller, work / "agents", "bench-real", telemetry_interval=5.0).start()
    summary: list[str] = []
    try:
        print(
            f"# {os.cpu_count()} cores; agent: {os.cpu_count()} workers x {THREADS} intra-op thread, direct runs the"
            f" same; {args.results} tenant results and {args.calls} calls per model; medians (machine may be shared)"
        )
        for case in cases(work):
            path = corpus.path(case.corpus)
            samples = work / f"{case.name}.npz"
            np.savez(samples, **sample_inputs(case.corpus, 4))  # type: ignore[arg-type]
            controller.cli(
                "models", "upload", str(path), "--name", case.name, "--version", "1",
                "--samples", str(samples), "--sensor", case.sensor, "--wait-timeout", "600",
            )  # fmt: skip
            rollout = controller.cli(
                "rollouts", "create", "--model", case.name, "--version", "1", "--tenant", case.tenant["id"],
                "--device", "bench-real",
            )  # fmt: skip
            rid = str(rollout["id"])
            final = wait_until(lambda: rollout_done(controller, rid), 180, f"{case.name} rollout")  # noqa: B023
            assert final["status"] == "succeeded", final

            # No pipeline runs yet: the tenant's gRPC calls and the direct runs take turns.
            run = direct_runner(path)
            with agent.channel() as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.InferRequest(tenant=case.tenant["id"], inputs=from_arrays(case.feed))
                direct, called = interleaved(
                    functools.partial(run, case.feed),
                    functools.partial(stub.Infer, request, timeout=30),
                    args.calls,
                )
            # Then the tenant's pipeline, with the direct run at the same pace beside it.
            response = controller.api("PUT", "/v1/devices/bench-real/tenants", json=[case.tenant])
            assert response.status_code == 200, response.text
            done = threading.Event()
            beside: list[np.ndarray] = []
            pacer = threading.Thread(
                target=lambda: beside.append(paced(lambda: run(case.feed), case.tenant["rate_hz"], done))  # noqa: B023 - joined below
            )
            piped = pipeline_latencies(agent, case.tenant["id"], args.results, on_first=pacer.start)
            done.set()
            pacer.join()
            controller.api("PUT", "/v1/devices/bench-real/tenants", json=[])
            d50, g50, b50, p50 = (float(np.percentile(x, 50)) for x in (direct, called, beside[0], piped))
            runtime = "LiteRT" if path.suffix == ".tflite" else "onnxruntime"
            print(f"\n## {case.corpus} ({path.name}, {path.stat().st_size} bytes, {runtime})")
            print(row("direct, in turn with the calls", direct))
            print(row("gRPC Infer (the tenant's call)", called))
            print(row("direct, beside the pipeline", beside[0]))
            print(row("tenant pipeline (capture->result)", piped))
            print(f"    ratio grpc/direct {g50 / d50:.2f}x   pipeline/direct {p50 / b50:.2f}x")
            summary.append(
                f"| {case.corpus} | {d50:.3f} | {g50:.3f} | {g50 / d50:.2f}x | {b50:.3f} | {p50:.3f} | {p50 / b50:.2f}x |"
            )
        print(
            "\n| model | direct p50 ms | gRPC Infer p50 ms | gRPC/direct | direct p50 ms beside the pipeline"
            " | pipeline p50 ms | pipeline/direct |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(summary))
    finally:
        agent.stop()
        controller.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
