"""Real third-party models, taken out of the PyPI wheels their authors publish.

Nothing here is built or trained by us: MediaPipe's TFLite task models, silero-vad's
ONNX voice detector and RapidOCR's PaddleOCR exports, each fetched with
``pip download --no-deps`` (the ordinary client, so a mirror or proxy configured for
pip applies) and extracted into a cache folder that later runs reuse without any
download. Each file is pinned by its sha256: a cached file that differs is fetched again.

The cache is ``$EDGEFLEET_TEST_MODELS`` or ``~/.cache/edgefleet-test-models``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet_proto import fleet_pb2

CACHE_ENV = "EDGEFLEET_TEST_MODELS"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel, for the platform the suite runs on (Linux x86_64, CPython 3.11)."""

    requirement: str
    # pip's --platform tags; empty for a pure-Python wheel.
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class RealModel:
    name: str
    wheel: Wheel
    member: str  # the file's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


# MediaPipe stopped shipping its .tflite files inside the wheel after 0.10.14.
MEDIAPIPE = Wheel("mediapipe==0.10.14", ("manylinux_2_17_x86_64", "manylinux2014_x86_64"))
SILERO = Wheel("silero-vad==6.2.3")
RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4")

CORPUS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "face_detection_short_range",
            MEDIAPIPE,
            "mediapipe/modules/face_detection/face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        ),
        RealModel(
            "selfie_segmentation",
            MEDIAPIPE,
            "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
            "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        ),
        RealModel(
            "silero_vad",
            SILERO,
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        ),
        RealModel(
            "ppocr_det",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        ),
        RealModel(
            "ppocr_cls",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        ),
    )
}


class CorpusUnavailable(RuntimeError):
    """pip could not fetch a wheel (no index reachable, or the pinned release is gone)."""


def default_cache() -> Path:
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path.home() / ".cache" / "edgefleet-test-models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelCorpus:
    """The corpus's files in ``cache``; ``pip`` is the command prefix that runs pip."""

    def __init__(self, cache: Path | None = None, pip: Sequence[str] | None = None) -> None:
        self.cache = cache or default_cache()
        self.pip = list(pip) if pip is not None else [sys.executable, "-m", "pip"]
        self.downloads = 0

    def path(self, name: str) -> Path:
        """The model file, fetched (with every other corpus file of its wheel) when not cached."""
        model = CORPUS[name]
        target = self.cache / model.filename
        if self._valid(target, model):
            return target
        self.cache.mkdir(parents=True, exist_ok=True)
        # Test workers running in parallel share the cache: one fetches, the others wait for it.
        with (self.cache / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._valid(target, model):
                self._fetch(model.wheel)
        if not self._valid(target, model):
            raise CorpusUnavailable(
                f"{model.wheel.requirement} has no {model.member} with sha256 {model.sha256}"
            )
        return target

    @staticmethod
    def _valid(path: Path, model: RealModel) -> bool:
        return path.is_file() and _sha256(path) == model.sha256

    def _fetch(self, wheel: Wheel) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".download-") as tmp:
            command = [*self.pip, "download", "--no-deps", "--only-binary=:all:", "--dest", tmp]
            if wheel.platforms:
                command += ["--python-version", "3.11", "--implementation", "cp"]
                for platform in wheel.platforms:
                    command += ["--platform", platform]
            command.append(wheel.requirement)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CorpusUnavailable(f"pip download {wheel.requirement}: {exc}") from None
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise CorpusUnavailable(f"pip download {wheel.requirement} failed: {' | '.join(tail)}")
            self.downloads += 1
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise CorpusUnavailable(f"pip download {wheel.requirement} gave {[w.name for w in wheels]}")
            self._extract(wheels[0], [m for m in CORPUS.values() if m.wheel == wheel], Path(tmp))

    def _extract(self, wheel_path: Path, models: list[RealModel], tmp: Path) -> None:
        with zipfile.ZipFile(wheel_path) as wheel:
            names = set(wheel.namelist())
            for model in models:
                if model.member not in names:
                    continue
                staged = tmp / model.filename
                with wheel.open(model.member) as src, staged.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                # Renamed into place whole: a run stopped mid-copy leaves no half file behind.
                os.replace(staged, self.cache / model.filename)


# -- inputs the way each model's own pipeline prepares them ----------------------

SAMPLE_RATE = 16000
# silero-vad 5+ takes 512 new samples at 16 kHz plus the 64 before them as context.
VAD_CHUNK, VAD_CONTEXT = 512, 64


def face_image(size: int = 128, center: tuple[float, float] = (0.5, 0.5), scale: float = 0.35) -> np.ndarray:
    """A frontal face drawn with OpenCV (skin ellipse, eyes, brows, nose, mouth) on a
    cluttered background: uint8 RGB, (size, size, 3)."""
    import cv2

    rng = np.random.default_rng(7)
    img = np.full((size, size, 3), (70, 90, 110), np.uint8)
    for _ in range(12):
        p = rng.integers(0, size, 2)
        cv2.rectangle(
            img,
            tuple(int(v) for v in p),
            tuple(int(v) for v in p + 20),
            tuple(int(c) for c in rng.integers(0, 255, 3)),
            -1,
        )
    cx, cy, r = int(center[0] * size), int(center[1] * size), int(scale * size)
    cv2.ellipse(img, (cx, cy), (int(r * 0.78), r), 0, 0, 360, (224, 172, 140), -1)
    cv2.ellipse(img, (cx, cy - int(r * 0.9)), (int(r * 0.8), int(r * 0.45)), 0, 180, 360, (40, 30, 25), -1)
    for side in (-1, 1):
        eye = (cx + side * int(r * 0.33), cy - int(r * 0.18))
        cv2.ellipse(img, eye, (int(r * 0.16), int(r * 0.08)), 0, 0, 360, (255, 255, 255), -1)
        cv2.circle(img, eye, max(1, int(r * 0.07)), (50, 35, 30), -1)
        cv2.line(
            img,
            (eye[0] - int(r * 0.18), eye[1] - int(r * 0.17)),
            (eye[0] + int(r * 0.18), eye[1] - int(r * 0.2)),
            (60, 40, 30),
            2,
        )
    cv2.line(img, (cx, cy - int(r * 0.05)), (cx - int(r * 0.08), cy + int(r * 0.22)), (180, 120, 100), 2)
    cv2.ellipse(img, (cx, cy + int(r * 0.48)), (int(r * 0.3), int(r * 0.12)), 0, 0, 180, (150, 60, 60), -1)
    return img


def text_image(height: int, width: int, text: str) -> np.ndarray:
    """Dark text printed with OpenCV on white: uint8 RGB, (height, width, 3)."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(img, text, (4, height * 2 // 3), cv2.FONT_HERSHEY_SIMPLEX, height / 60, (0, 0, 0), 2)
    return img


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced syllables: a 120-200 Hz harmonic source with formant-like partials, syllable-rate
    envelope and a little noise; float32 in [-1, 1] at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 150 + 30 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(
        np.sin(k * phase) * np.exp(-(((k * f0) - formant) ** 2) / 2e5)
        for k in range(1, 25)
        for formant in (700, 1200, 2600)
    )
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    audio = voice * envelope
    audio = 0.5 * audio / (np.abs(audio).max() or 1.0) + 0.005 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def vad_chunks(audio: np.ndarray) -> np.ndarray:
    """(chunks, 576): each 512-sample chunk with the 64 samples before it, as silero-vad is fed."""
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio])
    count = audio.size // VAD_CHUNK
    return np.stack([padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CHUNK + VAD_CONTEXT] for i in range(count)])


def sample_inputs(name: str, count: int = 8) -> dict[str, np.ndarray]:
    """``count`` samples for the model, named as its inputs, in its own layout and dtype."""
    if name == "face_detection_short_range":
        faces = [face_image(128, (0.3 + 0.05 * i, 0.5), 0.25 + 0.02 * i) for i in range(count)]
        return {"input": (np.stack(faces).astype(np.float32) / 127.5 - 1.0)}
    if name == "selfie_segmentation":
        people = [face_image(256, (0.5, 0.4), 0.2 + 0.02 * i) for i in range(count)]
        return {"input_1": np.stack(people).astype(np.float32) / 255.0}
    if name == "silero_vad":
        chunks = vad_chunks(speech_like(count * VAD_CHUNK / SAMPLE_RATE + 0.1))[:count]
        return {
            "input": chunks,
            "state": np.zeros((2, count, 128), np.float32),  # batch on axis 1
            "sr": np.array(SAMPLE_RATE, np.int64),  # a scalar, the same for every sample
        }
    if name in ("ppocr_det", "ppocr_cls"):
        h, w = (96, 96) if name == "ppocr_det" else (48, 192)
        mean, std = (
            (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
            if name == "ppocr_det"
            else (0.5, 0.5)
        )
        images = [text_image(h, w, f"EDGE {i}7{i}") for i in range(count)]
        x = (np.stack(images).astype(np.float32) / 255.0 - mean) / std
        return {"x": x.transpose(0, 3, 1, 2).astype(np.float32)}
    raise KeyError(name)


# -- broken copies: files that load and pass staging on their samples, then fail in the field --


def overflowing_copy(source: Path, target: Path, limit: float) -> Path:
    """A copy of a .onnx or .tflite model that fails on any input whose first input holds a value
    above ``limit`` (as an export with a too-narrow range fails on brighter or louder inputs than
    its sample set had): it loads, runs on samples scaled under ``limit``, and fails in the field.

    TFLite: its first output becomes ``output + 0 * sqrt(limit - max(first input))``, NaN past the
    limit. ONNX: ``max(first input) > limit`` indexes a one-entry table out of range (onnxruntime
    fails the run), and the looked-up 0 is added to its first int64 input, or else to its first
    output. The check stays out of reach of int8 quantization (no operator in it is quantized,
    so a quantized variant of the copy fails as the copy does). Every other tensor keeps its name,
    shape and values."""
    if source.suffix == ".tflite":
        target.write_bytes(_overflowing_tflite(source.read_bytes(), limit))
        return target
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    x = graph.input[0].name
    ints = [i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.INT64]
    tied = ints[0] if ints else graph.output[0].name
    unchecked = f"{tied}_unchecked"
    if ints:
        _rename_inputs(graph, tied, unchecked)
        before, after = tied, unchecked
    else:
        for node in graph.node:
            node.output[:] = [unchecked if name == tied else name for name in node.output]
        before, after = unchecked, tied
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(limit, np.float32), "overflow_limit"),
            numpy_helper.from_array(np.array([0], np.int64), "overflow_table"),
        ]
    )
    checks = [
        helper.make_node("ReduceMax", [x], ["overflow_peak"], keepdims=0),
        helper.make_node("Greater", ["overflow_peak", "overflow_limit"], ["overflow_over"]),
        helper.make_node("Cast", ["overflow_over"], ["overflow_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["overflow_table", "overflow_index"], ["overflow_zero"]),
    ]
    if ints:
        checks.append(helper.make_node("Add", [before, "overflow_zero"], [after]))
    else:
        checks.append(helper.make_node("Cast", ["overflow_zero"], ["overflow_zero_f"], to=TensorProto.FLOAT))
        checks.append(helper.make_node("Add", [before, "overflow_zero_f"], [after]))
    # Ahead of the model's own nodes, so the graph stays topologically sorted.
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(checks + nodes if ints else nodes + checks)
    onnx.save(model, str(target))
    return target


def _rename_inputs(graph: Any, old: str, new: str) -> None:
    """Every node reading ``old`` reads ``new``, in If/Loop bodies too (they see outer names)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attribute in node.attribute:
            for body in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                _rename_inputs(body, old, new)


def _overflowing_tflite(data: bytes, limit: float) -> bytes:
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = model.subgraphs[0]

    def opcode(code: int) -> int:
        for i, c in enumerate(model.operatorCodes):
            # Files written before the 2020 schema keep the code in the deprecated field only.
            if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
                return i
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    def tensor(name: str, shape: list[int], kind: int = schema.TensorType.FLOAT32, value: Any = None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, np.int32), kind
        buffer = schema.BufferT()
        if value is not None:
            buffer.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8)
        model.buffers.append(buffer)
        t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int], kind: int = 0, options: Any = None) -> None:
        o = schema.OperatorT()
        o.opcodeIndex = opcode(code)
        o.inputs, o.outputs = np.array(inputs, np.int32), np.array(outputs, np.int32)
        o.builtinOptionsType, o.builtinOptions = kind, options
        graph.operators.append(o)

    x, out = int(graph.inputs[0]), int(graph.outputs[0])
    name = graph.tensors[out].name
    graph.tensors[out].name = name + b"_unchecked"
    rank = len(graph.tensors[x].shape)
    axes = tensor("overflow_axes", [rank], schema.TensorType.INT32, np.arange(rank, dtype=np.int32))
    lim = tensor("overflow_limit", [], value=np.float32(limit))
    zero = tensor("overflow_zero", [], value=np.float32(0.0))
    peak, room, root, nan = (
        tensor(n, []) for n in ("overflow_peak", "overflow_room", "overflow_root", "overflow_nan")
    )
    checked = tensor(name.decode(), list(graph.tensors[out].shape))
    graph.tensors[checked].shapeSignature = graph.tensors[out].shapeSignature
    reducer = schema.ReducerOptionsT()
    reducer.keepDims = False
    op(schema.BuiltinOperator.REDUCE_MAX, [x, axes], [peak], schema.BuiltinOptions.ReducerOptions, reducer)
    op(
        schema.BuiltinOperator.SUB,
        [lim, peak],
        [room],
        schema.BuiltinOptions.SubOptions,
        schema.SubOptionsT(),
    )
    op(schema.BuiltinOperator.SQRT, [room], [root])
    op(
        schema.BuiltinOperator.MUL,
        [root, zero],
        [nan],
        schema.BuiltinOptions.MulOptions,
        schema.MulOptionsT(),
    )
    op(
        schema.BuiltinOperator.ADD,
        [out, nan],
        [checked],
        schema.BuiltinOptions.AddOptions,
        schema.AddOptionsT(),
    )
    outputs = [int(i) for i in graph.outputs]
    outputs[0] = checked
    graph.outputs = np.array(outputs, np.int32)
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def fixed_shape_copy(source: Path, target: Path, dims: Sequence[int]) -> Path:
    """A copy of an ONNX model whose first input takes only ``dims`` (-1 keeps an axis free), as a
    re-export traced at its sample's size would: it runs on samples of that size and refuses the
    frames a tenant resizes otherwise."""
    import onnx

    model = onnx.load(str(source))
    shape = model.graph.input[0].type.tensor_type.shape
    for axis, size in zip(shape.dim, dims, strict=True):
        if size >= 0:
            axis.Clear()
            axis.dim_value = size
    onnx.save(model, str(target))
    return target


def silero_signature(length: int = -1) -> fleet_pb2.ModelSignature:
    """silero-vad's signature as the controller sends it: its audio a source of layout NT
    (``length`` samples per window, -1: free), its RNN state carried from ``stateN``, its
    sample rate a constant."""
    sig = fleet_pb2.ModelSignature()
    sig.inputs.add(
        name="input", role="source", layout="NT", batch_axis=0, dtype="float32", shape=[-1, length]
    )
    sig.inputs.add(
        name="state", role="state", batch_axis=1, dtype="float32", shape=[2, -1, 128], value=[0.0],
        from_output="stateN",
    )  # fmt: skip
    sig.inputs.add(
        name="sr", role="constant", batch_axis=-1, dtype="int64", shape=[], value=[float(SAMPLE_RATE)]
    )
    sig.outputs.add(name="output", meaning="scores", dtype="float32", shape=[-1, 1])
    sig.outputs.add(name="stateN", meaning="state", dtype="float32", shape=[2, -1, 128])
    return sig
