"""Model runtimes behind one small interface.

A :class:`Backend` loads a model file and returns a :class:`LoadedModel` that
runs named numpy tensors. ONNX Runtime is the implementation today; a LiteRT
backend plugs into :data:`BACKENDS` the same way. No other agent module imports
a runtime library.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agent.errors import InferenceError, InvalidInput, ModelLoadError, UnsupportedRuntime


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    # -1 marks a dimension the model leaves free.
    shape: tuple[int, ...]


class LoadedModel(Protocol):
    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, path: Path) -> LoadedModel: ...


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _spec(arg: Any, role: str) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(
            f"{role} {arg.name!r} has type {arg.type}; only numeric tensors are served "
            "(for scikit-learn classifiers convert with options={id(model): {'zipmap': False}})"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, dtype, shape)


class OnnxModel:
    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._inputs = [_spec(a, "input") for a in session.get_inputs()]
        self._outputs = [_spec(a, "output") for a in session.get_outputs()]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        check_inputs(self._inputs, inputs)
        known = [o.name for o in self._outputs]
        names = list(output_names) or known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; the model has {known}")
        try:
            results = self._session.run(names, dict(inputs))
        except Exception as exc:
            kind = type(exc).__name__
            if kind in ("InvalidArgument", "InvalidGraph") or isinstance(exc, ValueError | TypeError):
                raise InvalidInput(f"onnxruntime refused the inputs: {exc}") from None
            raise InferenceError(f"onnxruntime failed ({kind}): {exc}") from None
        out: dict[str, np.ndarray] = {}
        for name, value in zip(names, results, strict=True):
            if not isinstance(value, np.ndarray):
                raise InferenceError(f"output {name!r} is a {type(value).__name__}, not a tensor")
            out[name] = value
        return out


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Say precisely what is wrong with the caller's tensors before the runtime does."""
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InvalidInput(f"inputs do not match the model: missing {missing}, unexpected {extra}")
    for name, array in inputs.items():
        spec = expected[name]
        if array.dtype.name != spec.dtype:
            raise InvalidInput(f"input {name!r} is {array.dtype.name}, the model wants {spec.dtype}")
        if spec.shape and len(spec.shape) != array.ndim:
            raise InvalidInput(
                f"input {name!r} has shape {list(array.shape)}, the model wants {list(spec.shape)}"
            )
        for have, want in zip(array.shape, spec.shape, strict=False):
            if want >= 0 and have != want:
                raise InvalidInput(
                    f"input {name!r} has shape {list(array.shape)}, the model wants {list(spec.shape)}"
                )


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1

    def load(self, path: Path) -> LoadedModel:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
        return OnnxModel(session)


# Factories take an optional ``threads`` keyword: the intra-op threads per loaded
# model, which the scheduler sets so its workers do not oversubscribe the cores.
BACKENDS: dict[str, Callable[..., Backend]] = {"onnxruntime": OnnxRuntimeBackend}
DEFAULT_RUNTIME_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}


def backend_for(runtime: str, fmt: str = "onnx", threads: int | None = None) -> Backend:
    name = runtime or DEFAULT_RUNTIME_FOR_FORMAT.get(fmt, "")
    factory = BACKENDS.get(name)
    if factory is None:
        raise UnsupportedRuntime(
            f"runtime {name or '(none)'!r} for format {fmt!r} is not available on this agent "
            f"(available: {', '.join(sorted(BACKENDS))})"
        )
    return factory(threads=threads) if threads else factory()
