"""How much memory a model file takes once a runtime loads it, estimated from the file.

A few hundred bytes of ONNX can ask for gigabytes: a ``ConstantOfShape`` (or an
``Expand``, ``Tile``, ``Range``...) whose inputs are constants is folded into a
weight when onnxruntime creates the session. So before any runtime sees an
upload, :func:`check_onnx` adds up what loading it holds (initializers, Constant
tensors, and every tensor computable from constants alone, sized by ONNX shape
inference) and refuses the model when that, or any single tensor whose size is
statically known, exceeds the bound. Weights in external data files are refused:
an artifact is one self-contained file (a device receives only that file, and a
path in the model must not reach other files on the controller).
:func:`check_tflite` sums the tensors LiteRT would allocate.

Expansion that shape inference cannot size is caught by the memory limit of the
checker process (:mod:`controller.model_check`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

from controller.errors import InvalidModel

# Tensors at most this big stay in the copy given to shape inference: shape
# arithmetic (Reshape targets, ConstantOfShape shapes) reads their values.
_KEEP_VALUES_BYTES = 4096
# Operators onnxruntime never folds although their inputs are constant.
_NOT_FOLDED = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)


@dataclass(frozen=True)
class Estimate:
    """Bytes a runtime holds after loading the model, and the biggest single contributor."""

    weights: int
    folded: int
    largest_name: str
    largest_what: str
    largest_bytes: int

    @property
    def total(self) -> int:
        return self.weights + self.folded


def _itemsize(data_type: int) -> float:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 0.5
    try:
        return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8.0  # strings and types numpy lacks: count them as wide as a pointer


def tensor_bytes(tensor: TensorProto) -> int:
    """The dense size of a tensor from its dims, whatever way (or whether) its data is stored."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return math.ceil(math.prod(tensor.dims) * _itemsize(tensor.data_type))


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _sparse_dense_bytes(sparse: onnx.SparseTensorProto) -> int:
    return math.ceil(math.prod(sparse.dims) * _itemsize(sparse.values.data_type))


def _refuse_external(tensor: TensorProto, where: str) -> None:
    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
        raise InvalidModel(
            f"{where} {tensor.name!r} keeps its data in an external file ({location!r}); "
            "upload the model as one self-contained file"
        )


def _static_bytes(value_type: onnx.TypeProto) -> int | None:
    """Bytes of a tensor type whose every dimension is known, else None."""
    if not value_type.HasField("tensor_type"):
        return None
    tt = value_type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return math.ceil(math.prod(dims) * _itemsize(tt.elem_type))


class _Tally:
    def __init__(self) -> None:
        self.weights = 0
        self.folded = 0
        self.largest = ("", "", 0)

    def add(self, name: str, what: str, size: int, folded: bool = False) -> None:
        if folded:
            self.folded += size
        else:
            self.weights += size
        if size > self.largest[2]:
            self.largest = (name, what, size)


def estimate_onnx(model: ModelProto, limit: int) -> Estimate:
    """What loading ``model`` holds; raises InvalidModel for external data or a tensor over ``limit``."""
    tally = _Tally()
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            _refuse_external(tensor, "initializer")
            tally.add(tensor.name, "initializer", tensor_bytes(tensor))
        for sparse in graph.sparse_initializer:
            _refuse_external(sparse.values, "sparse initializer")
            # onnxruntime stores sparse initializers dense.
            tally.add(sparse.values.name, "sparse initializer", _sparse_dense_bytes(sparse))
        for node in graph.node:
            if node.op_type != "Constant":
                continue
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    _refuse_external(attr.t, "constant")
                    tally.add(node.output[0], "Constant", tensor_bytes(attr.t))
                elif attr.type == AttributeProto.SPARSE_TENSOR:
                    tally.add(node.output[0], "Constant", _sparse_dense_bytes(attr.sparse_tensor))
    _fold(model, tally, limit)
    name, what, size = tally.largest
    return Estimate(tally.weights, tally.folded, name, what, size)


def _without_big_values(model: ModelProto) -> ModelProto:
    """A copy for shape inference: large weights become typed graph inputs (their values are
    never shape arithmetic), so the copy costs little memory whatever the model's size."""
    light = ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, out = model.graph, light.graph
    out.name = graph.name
    declared = {i.name for i in graph.input}
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    for tensor in graph.initializer:
        if tensor_bytes(tensor) <= _KEEP_VALUES_BYTES:
            out.initializer.append(tensor)
        elif tensor.name not in declared:
            out.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    out.sparse_initializer.extend(graph.sparse_initializer)
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.type == AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and tensor_bytes(value) > _KEEP_VALUES_BYTES:
            out.input.append(
                onnx.helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims))
            )
        else:
            out.node.append(node)
    return light


def _constant_names(model: ModelProto) -> set[str]:
    names: set[str] = set()
    for graph in _graphs(model.graph):
        names |= {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        names |= {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    return names


def _fold(model: ModelProto, tally: _Tally, limit: int) -> None:
    """Add every tensor onnxruntime computes from constants at load; refuse any tensor whose
    statically known size exceeds ``limit`` (folded at load, or produced when the model runs)."""
    try:
        # Without data propagation: with it, onnx computes ConstantOfShape's values itself.
        inferred = onnx.shape_inference.infer_shapes(_without_big_values(model))
    except Exception:  # onnx raises several types; the checker reports a broken graph
        return
    constant = _constant_names(model)
    for graph in _graphs(inferred.graph):
        types = {v.name: v.type for v in [*graph.value_info, *graph.output, *graph.input]}
        for node in graph.node:
            folds = node.op_type == "Constant" or (
                node.op_type not in _NOT_FOLDED
                and any(node.input)
                and all(i in constant for i in node.input if i)
            )
            for out in node.output:
                size = _static_bytes(types[out]) if out in types else None
                if size is not None and size > limit:
                    raise InvalidModel(
                        f"{node.op_type} node {node.name or out!r} produces tensor {out!r} of "
                        f"{human(size)}, more than the {human(limit)} a model may take in memory "
                        "(max_model_memory_bytes)"
                    )
                if folds and node.op_type != "Constant":
                    constant.add(out)
                    if size is not None:
                        tally.add(out, f"{node.op_type} output computed at load", size, folded=True)


def check_onnx(path: Path, limit: int) -> Estimate:
    """Refuse (InvalidModel) an ONNX file whose load would hold more than ``limit`` bytes."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise unrelated types
        raise InvalidModel(
            f"onnx cannot parse the model: {str(exc).strip()[:500] or type(exc).__name__}"
        ) from None
    estimate = estimate_onnx(model, limit)
    if estimate.total > limit:
        raise InvalidModel(
            f"loading the model would take about {human(estimate.total)} "
            f"(weights {human(estimate.weights)}, computed from constants at load {human(estimate.folded)}; "
            f"largest: {estimate.largest_what} {estimate.largest_name!r} of {human(estimate.largest_bytes)}), "
            f"more than the {human(limit)} a model may take in memory (max_model_memory_bytes)"
        )
    return estimate


def check_tflite(path: Path, limit: int, interpreter_class: Any) -> int:
    """Refuse a TFLite file whose tensors (constant buffers and the arena) exceed ``limit``
    bytes, from the interpreter's tensor table before any tensor is allocated."""
    try:
        details = interpreter_class(model_path=str(path)).get_tensor_details()
    except Exception as exc:  # the interpreter raises ValueError/RuntimeError
        raise InvalidModel(f"LiteRT cannot load the model: {str(exc).strip()[:2000]}") from None
    total = 0
    for d in details:
        shape = [max(int(x), 1) for x in d["shape"]]
        size = math.prod(shape) * np.dtype(d["dtype"]).itemsize
        if size > limit:
            raise InvalidModel(
                f"tensor {d['name']!r} takes {human(size)}, more than the {human(limit)} "
                "a model may take in memory (max_model_memory_bytes)"
            )
        total += size
    if total > limit:
        raise InvalidModel(
            f"the model's tensors take {human(total)}, more than the {human(limit)} "
            "a model may take in memory (max_model_memory_bytes)"
        )
    return total
