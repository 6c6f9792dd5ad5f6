"""Model runtimes behind one small interface.

A :class:`Backend` loads a model file and returns a :class:`LoadedModel` that
runs named numpy tensors. Two implementations: ONNX Runtime, and LiteRT
(``ai_edge_litert``, or ``tflite_runtime`` where only that is installed) for
.tflite files; :data:`BACKENDS` lists those that import on this device. No
other agent module imports a runtime library.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import math
import os
import threading
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from agent.accelerators import Accelerator, OnnxPlan, backend_of
from agent.errors import InferenceError, InvalidInput, ModelLoadError, UnsupportedRuntime

if TYPE_CHECKING:
    import onnxruntime as ort


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
        # What each call is checked against, worked out once for the session.
        self._check = InputCheck(self._inputs)
        self._output_names = [s.name for s in self._outputs]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        self._check(inputs)
        names = select_outputs(self._outputs, output_names) if output_names else self._output_names
        try:
            results = self._session.run(names, inputs if type(inputs) is dict else dict(inputs))
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
        return check_outputs(out)


def check_outputs(outputs: dict[str, np.ndarray], exact: Container[str] = ()) -> dict[str, np.ndarray]:
    """A NaN is no answer: a run that gives one (a corrupt weight, an input the model was never
    meant for) failed, so the gates and the probation count it, as they count a runtime error.
    ``exact``: outputs that cannot hold one (dequantized from integers), not scanned."""
    for name, value in outputs.items():
        if value.dtype.kind in "fc" and name not in exact:
            bad = int(np.count_nonzero(np.isnan(value)))
            if bad:
                raise InferenceError(f"output {name!r} holds NaN in {bad} of its {value.size} values")
    return outputs


class InputCheck:
    """:func:`check_inputs` for one model, its expectations worked out once: per input the dtype
    object (comparing it costs no ``dtype.name``, which numpy builds anew each time), the rank
    and the axes the model fixes. Tensors that fit pass after a few comparisons; anything else
    goes to :func:`check_inputs`, which says what is wrong (or lets through what only differs in
    byte order, as it always did)."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
        self._expected = {s.name: _expectation(s) for s in self.specs}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> None:
        expected = self._expected
        if len(inputs) == len(expected):
            for name, array in inputs.items():
                want = expected.get(name)
                if want is None:
                    break
                dtype, rank, fixed, lengths = want
                have = array.dtype
                if have is not dtype and have != dtype:
                    break
                shape = array.shape
                if rank >= 0 and len(shape) != rank:
                    break
                if fixed is not None and fixed(shape) != lengths:
                    break
            else:
                return
        check_inputs(self.specs, inputs)


def _expectation(spec: TensorSpec) -> tuple[np.dtype, int, itemgetter[Any] | None, Any]:
    """(dtype, rank or -1 when the model states no shape, what picks the fixed axes' lengths
    out of a shape (None when no axis is fixed), and those lengths as the model states them)."""
    axes = [axis for axis, length in enumerate(spec.shape) if length >= 0]
    if not axes:
        return np.dtype(spec.dtype), len(spec.shape) if spec.shape else -1, None, None
    fixed = itemgetter(*axes)
    return np.dtype(spec.dtype), len(spec.shape), fixed, fixed(spec.shape)


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


def select_outputs(specs: Sequence[TensorSpec], wanted: Sequence[str]) -> list[str]:
    """The outputs to compute: those asked for (all when none are), each one the model has."""
    known = [s.name for s in specs]
    names = list(wanted) or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model has {known}")
    return names


def onnx_available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (CUDA and TensorRT with onnxruntime-gpu)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        threads: int | None = None,
        accelerator: Accelerator | None = None,
        available_providers: Callable[[], Sequence[str]] = onnx_available_providers,
    ) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.accelerator = accelerator if accelerator is not None and accelerator.drives(self.name) else None
        self.available_providers = available_providers

    def load(self, path: Path) -> LoadedModel:
        # Imported on first use: an agent that only serves .tflite models never
        # pays onnxruntime's import time and memory.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        plan: OnnxPlan | None = None
        if self.accelerator is not None:
            plan = self.accelerator.plan(self.available_providers())
        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=options,
                providers=list(plan.providers) if plan else ["CPUExecutionProvider"],
            )
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
        if plan is not None and self.accelerator is not None:
            # onnxruntime drops a provider whose libraries fail to load and goes on without it.
            self.accelerator.session_used(plan, session.get_providers())
        return OnnxModel(session)


def litert_interpreter() -> Any | None:
    """The LiteRT interpreter class, or tflite-runtime's; None when neither imports.

    tflite-runtime 2.14 wheels need numpy < 2 and crash with numpy 2, so LiteRT is tried first.
    """
    module = _litert_module()
    return None if module is None else module.Interpreter


def _litert_module() -> Any | None:
    for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def load_litert_delegate(accelerator: Accelerator) -> list[Any]:
    """The accelerator's LiteRT delegate, loaded, as a list for the interpreter; empty (and the
    condition reported) when this device cannot load it."""
    library = accelerator.delegate()
    module = _litert_module()
    if not library or module is None:
        return []
    try:
        # Opened first by ctypes: LiteRT's Delegate raises from a half-made object when the
        # library is missing, and its destructor then prints a second, misleading error.
        ctypes.CDLL(library)
        return [module.load_delegate(library)]
    except (OSError, ValueError, RuntimeError) as exc:
        accelerator.unavailable(f"its LiteRT delegate {library} does not load: {exc}")
        return []


def _litert_spec(detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(str(detail["name"]), np.dtype(detail["dtype"]).name, tuple(int(d) for d in shape))


def _quantization(detail: Mapping[str, Any]) -> tuple[float, int] | None:
    """A tensor's per-tensor (scale, zero point) when it holds quantized integers, else None."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    params = detail.get("quantization_parameters") or {}
    scales, zeros = list(params.get("scales", ())), list(params.get("zero_points", ()))
    if len(scales) != 1 or not scales[0] > 0:
        return None
    return float(scales[0]), int(zeros[0]) if zeros else 0


def _float_spec(spec: TensorSpec) -> TensorSpec:
    return TensorSpec(spec.name, "float32", spec.shape)


class LiteRtModel:
    """One TFLite interpreter. It is not thread-safe, so runs are serialised; a batch size
    other than the one allocated resizes the input tensors first.

    A fully quantized model (int8 inputs and outputs, as an integer-only accelerator wants)
    is served with float32 tensors at its edge, quantized and dequantized by the tensors'
    own parameters: samples, tenant sources, gates and drift all speak real values, whatever
    variant a device got. A caller may still hand an input its raw integers."""

    def __init__(self, interpreter: Any) -> None:
        self._interpreter = interpreter
        self._lock = threading.Lock()
        self._in = interpreter.get_input_details()
        self._out = interpreter.get_output_details()
        self._raw_inputs = [_litert_spec(d) for d in self._in]
        self._quant_in = {str(d["name"]): q for d in self._in if (q := _quantization(d)) is not None}
        self._quant_out = {str(d["name"]): q for d in self._out if (q := _quantization(d)) is not None}
        self._inputs = [_float_spec(s) if s.name in self._quant_in else s for s in self._raw_inputs]
        self._outputs = [
            _float_spec(s) if s.name in self._quant_out else s for s in (_litert_spec(d) for d in self._out)
        ]
        # Worked out once, not per run: the checks, and the tensor indices (fixed by the model;
        # a resize changes shapes only).
        self._check = InputCheck(self._raw_inputs)
        self._raw_dtypes = {s.name: np.dtype(s.dtype) for s in self._raw_inputs}
        self._output_names = [s.name for s in self._outputs]
        self._output_index = {str(d["name"]): d["index"] for d in self._out}
        # Dequantized by a finite scale, an output cannot hold NaN: it is not scanned for one.
        self._exact_outputs = frozenset(
            n for n, (scale, _) in self._quant_out.items() if math.isfinite(scale)
        )
        # The input shapes allocated now, as the interpreter would report them: only this
        # object resizes its interpreter, under its lock.
        self._allocated = {str(d["name"]): tuple(int(x) for x in d["shape"]) for d in self._in}

    def _quantize(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if not self._quant_in:
            return inputs
        out = dict(inputs)
        for name, (scale, zero) in self._quant_in.items():
            array = out.get(name)
            if array is None or array.dtype.kind != "f":
                continue
            dtype = self._raw_dtypes[name]
            info = np.iinfo(dtype)
            q = np.round(array.astype(np.float64) / scale) + zero
            out[name] = np.clip(q, info.min, info.max).astype(dtype)
        return out

    def _dequantize(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, (scale, zero) in self._quant_out.items():
            if name in outputs:
                outputs[name] = ((outputs[name].astype(np.float32) - zero) * scale).astype(np.float32)
        return outputs

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        inputs = self._quantize(inputs)
        self._check(inputs)
        names = select_outputs(self._outputs, output_names) if output_names else self._output_names
        interpreter = self._interpreter
        with self._lock:
            try:
                self._resize(inputs)
                for detail in self._in:
                    interpreter.set_tensor(detail["index"], np.ascontiguousarray(inputs[detail["name"]]))
                interpreter.invoke()
                index = self._output_index
                out = {n: np.array(interpreter.get_tensor(index[n])) for n in names}
            except ValueError as exc:
                raise InvalidInput(f"LiteRT refused the inputs: {exc}") from None
            except RuntimeError as exc:
                raise InferenceError(f"LiteRT failed: {exc}") from None
        return check_outputs(self._dequantize(out), self._exact_outputs)

    def _resize(self, inputs: Mapping[str, np.ndarray]) -> None:
        changed = False
        for detail in self._in:
            name = detail["name"]
            shape = inputs[name].shape
            if self._allocated[name] != shape:
                self._interpreter.resize_tensor_input(detail["index"], list(shape), strict=True)
                self._allocated[name] = shape
                changed = True
        if changed:
            self._interpreter.allocate_tensors()


class LiteRtBackend:
    name = "litert"

    def __init__(self, threads: int | None = None, accelerator: Accelerator | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.accelerator = accelerator if accelerator is not None and accelerator.drives(self.name) else None

    def load(self, path: Path) -> LoadedModel:
        interpreter_class = litert_interpreter()
        if interpreter_class is None:
            raise UnsupportedRuntime("neither ai-edge-litert nor tflite-runtime is installed on this agent")
        delegates = load_litert_delegate(self.accelerator) if self.accelerator is not None else []
        if delegates and self.accelerator is not None:
            try:
                interpreter = interpreter_class(
                    model_path=str(path), num_threads=self.threads, experimental_delegates=delegates
                )
                interpreter.allocate_tensors()
                self.accelerator.in_use(self.accelerator.delegate())
                return LiteRtModel(interpreter)
            except (ValueError, RuntimeError) as exc:
                # A model the delegate cannot take (not compiled for an Edge TPU, ops the NPU
                # lacks) still serves: on the CPU, with the reason reported.
                self.accelerator.unavailable(f"its delegate refused {path.name}: {exc}")
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=self.threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load {path.name}: {exc}") from None
        return LiteRtModel(interpreter)


def probe_accelerator(accelerator: Accelerator) -> None:
    """At start, before any model loads: report a declared accelerator this device cannot use."""
    if not accelerator.declared:
        return
    backend = backend_of(accelerator.runtime)
    if not backend:
        accelerator.unknown_backend()
    elif backend not in BACKENDS:
        accelerator.unavailable(f"{backend} is not installed on this agent")
    elif backend == "onnxruntime":
        accelerator.plan(onnx_available_providers())
    else:
        load_litert_delegate(accelerator)


# Factories take an optional ``threads`` keyword: the intra-op threads per loaded
# model, which the scheduler sets so its workers do not oversubscribe the cores.
# What is installed decides what is offered, found without importing anything.
BACKENDS: dict[str, Callable[..., Backend]] = {}
if importlib.util.find_spec("onnxruntime") is not None:
    BACKENDS["onnxruntime"] = OnnxRuntimeBackend
if any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime")):
    BACKENDS["litert"] = LiteRtBackend
DEFAULT_RUNTIME_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}


def backend_for(
    runtime: str, fmt: str = "onnx", threads: int | None = None, accelerator: Accelerator | None = None
) -> Backend:
    name = runtime or DEFAULT_RUNTIME_FOR_FORMAT.get(fmt, "")
    factory = BACKENDS.get(name)
    if factory is None:
        raise UnsupportedRuntime(
            f"runtime {name or '(none)'!r} for format {fmt!r} is not available on this agent "
            f"(available: {', '.join(sorted(BACKENDS))})"
        )
    return factory(threads=threads or None, accelerator=accelerator)
