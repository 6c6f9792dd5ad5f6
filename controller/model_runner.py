"""One model file, ONNX or TFLite, run on named inputs the way a device runs it.

ONNX through onnxruntime, TFLite through LiteRT (quantized inputs and outputs
converted with their scale and zero point), one intra-op thread, so latencies
compare between variants and with what a small device sees.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from controller.tflite import interpreter_module, is_tflite

LATENCY_WARMUP = 3
LATENCY_RUNS = 20


def file_format(path: Path) -> str:
    with path.open("rb") as f:
        return "tflite" if is_tflite(f.read(8)) else "onnx"


class Runner:
    """One model file (ONNX or TFLite), run one sample at a time on named inputs by position."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.format = fmt
        if fmt == "tflite":
            mod, _, _ = interpreter_module()
            self._interpreter = mod.Interpreter(model_path=str(path), num_threads=1)
            self._interpreter.allocate_tensors()
            self._in = self._interpreter.get_input_details()
            self._out = self._interpreter.get_output_details()
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._names = [i.name for i in self._session.get_inputs()]

    def run(self, sample: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``sample``: the inputs in the model's order, each with a leading batch axis of 1."""
        if self.format == "tflite":
            for detail, array in zip(self._in, sample, strict=True):
                self._interpreter.set_tensor(detail["index"], _to_tflite(array, detail))
            self._interpreter.invoke()
            return [_from_tflite(self._interpreter.get_tensor(d["index"]), d) for d in self._out]
        outputs = self._session.run(None, dict(zip(self._names, sample, strict=True)))
        return [np.asarray(o) for o in outputs]

    def run_all(self, samples: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """Every sample, outputs stacked along the batch axis."""
        return _stacked([self.run(s) for s in samples])

    def run_sequence(
        self, samples: Sequence[Sequence[np.ndarray]], feedback: Mapping[int, int]
    ) -> list[np.ndarray]:
        """The samples as one stream: from the second step on, input ``i`` takes output
        ``feedback[i]`` of the step before (a recurrent state), the first step its sample's own."""
        per_step: list[list[np.ndarray]] = []
        for sample in samples:
            feed = list(sample)
            if per_step:
                for i, o in feedback.items():
                    feed[i] = per_step[-1][o].astype(feed[i].dtype, copy=False).reshape(feed[i].shape)
            per_step.append(self.run(feed))
        return _stacked(per_step)

    def latency_ms(self, sample: Sequence[np.ndarray]) -> float:
        for _ in range(LATENCY_WARMUP):
            self.run(sample)
        times = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            self.run(sample)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)


def _stacked(per_sample: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [
        np.stack(outs) if outs[0].ndim == 0 else np.concatenate(outs)
        for outs in ([out[i] for out in per_sample] for i in range(len(per_sample[0])))
    ]


def _to_tflite(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Quantize a float input when the TFLite model takes int8/uint8 (scale, zero point)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = float(detail["quantization"][0]), int(detail["quantization"][1])
    if dtype.kind in "iu" and array.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale + zero), info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _from_tflite(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = float(detail["quantization"][0]), int(detail["quantization"][1])
    if array.dtype.kind in "iu" and scale:
        return ((array.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.array(array)
