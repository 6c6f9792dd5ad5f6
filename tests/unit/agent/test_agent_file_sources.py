"""A file replayed as fast as its model consumes it loses no frame; a live source keeps its newest.

Real pipelines, real onnxruntime: a model that counts the frames it is fed (its count is a
state carried from output to input, as silero-vad's RNN state is) reads a CSV file, a WAV file
and a synthetic camera through a lane that holds one job. A file at ``rate_hz = 0`` waits for
room in the lane (back-pressure), so the count reaches the file's length; a live source keeps
dropping its oldest frame when the model is behind, since its newest is the one worth running.
"""

from __future__ import annotations

import queue
import time
import wave
from pathlib import Path

import numpy as np
import onnx
from edgefleet_proto import inference_pb2
from onnx import TensorProto, helper

from agent.pipeline import Pipelines, ResultHub
from agent.pool import ModelPool, ServingModel
from agent.signature import InputRole, ModelSignature, OutputMeaning
from agent.telemetry import PipelineStats
from agent.tenants import SourceSpec, TenantSpec
from agent.tensors import to_numpy
from tests.support.model_bytes import write_model

FRAMES = 400


def frame_counter(width: int) -> bytes:
    """frames: float32[1, width], count: float32[1] -> count_out = count + 1, and the frame's sum
    (work that takes a little time, so a source can outrun the model)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["count", "one"], ["count_out"]),
            helper.make_node("ReduceSum", ["frames"], ["total"], keepdims=0),
        ],
        "frame_counter",
        [
            helper.make_tensor_value_info("frames", TensorProto.FLOAT, [1, width]),
            helper.make_tensor_value_info("count", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def counter_signature(width: int) -> ModelSignature:
    return ModelSignature(
        inputs=(
            InputRole("frames", "source", "NC", 0, "float32", (1, width)),
            InputRole("count", "state", "", -1, "float32", (1,), (0.0,), "count_out"),
        ),
        outputs=(
            OutputMeaning("count_out", "state", "float32", (1,)),
            OutputMeaning("total", "", "float32", ()),
        ),
    )


def pipelines_with_counter(tmp_path: Path, width: int) -> tuple[Pipelines, queue.Queue[inference_pb2.Result]]:
    published: queue.Queue[inference_pb2.Result] = queue.Queue()
    p = Pipelines(
        "dev-1",
        ModelPool(threads=1),
        1,
        PipelineStats(),
        lambda *a: None,
        lambda topic, payload: published.put(inference_pb2.Result.FromString(payload)),
        ResultHub(),
    )
    path = tmp_path / "counter.onnx"
    digest = write_model(path, frame_counter(width))
    p.pool.put(
        ServingModel(
            "t", "counter", "1", digest, "onnxruntime", path, p.pool.load(digest, path, "onnxruntime"),
            counter_signature(width),
        )
    )  # fmt: skip
    return p, published


def first_pass(published: queue.Queue[inference_pb2.Result], last_seq: int) -> list[inference_pb2.Result]:
    """The results of the source's first run, up to the one of its last sample."""
    got: list[inference_pb2.Result] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            result = published.get(timeout=1)
        except queue.Empty:
            continue
        if result.source_epoch != 1:
            continue
        got.append(result)
        if result.seq == last_seq:
            return got
    raise AssertionError(f"no result for sample {last_seq} of the first run; got {len(got)} results")


def counted(result: inference_pb2.Result) -> int:
    return int(to_numpy(result.outputs["count_out"]).ravel()[0])


def run(tmp_path: Path, source: SourceSpec, width: int, last_seq: int) -> list[inference_pb2.Result]:
    """The first run of ``source`` through a lane of one job, at rate 0 (as fast as it goes)."""
    p, published = pipelines_with_counter(tmp_path, width)
    p.start()
    p.apply((TenantSpec("t", source, model="counter", queue=1, results=frozenset({"mqtt"})),))
    try:
        return first_pass(published, last_seq)
    finally:
        p.apply(())
        p.stop(10)


def test_a_csv_file_at_rate_zero_feeds_every_row_with_its_state_carried(tmp_path: Path) -> None:
    rows = np.arange(FRAMES * 8, dtype=np.float32).reshape(FRAMES, 8)
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%g")
    results = run(tmp_path, SourceSpec("csv", str(csv)), 8, FRAMES - 1)
    assert [r.seq for r in results] == list(range(FRAMES))  # none dropped, in order
    assert counted(results[-1]) == FRAMES  # the state went through every frame


def test_a_wav_file_at_rate_zero_feeds_every_window(tmp_path: Path) -> None:
    window = 256
    audio = (np.sin(np.arange(FRAMES * window) / 7.0) * 12000).astype(np.int16)
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.tobytes())
    results = run(tmp_path, SourceSpec("wav", str(path), {"chunk": str(window)}), window, FRAMES - 1)
    assert counted(results[-1]) == FRAMES and len(results) == FRAMES


def test_a_live_source_keeps_dropping_its_oldest_when_the_model_is_behind(tmp_path: Path) -> None:
    # A synthetic sensor stands for a live one: it never waits for the model.
    live = SourceSpec("synthetic", "", {"shape": "8", "sample_kind": "rows", "count": str(FRAMES * 5)})
    results = run(tmp_path, live, 8, FRAMES * 5 - 1)
    assert counted(results[-1]) < FRAMES * 5  # some frames were dropped, the newest kept
    assert results[-1].seq == FRAMES * 5 - 1
