"""Which ONNX files each ONNX Runtime release reads, and a file made readable by older ones.

ONNX Runtime refuses a model whose IR version is newer than the ONNX release it was built
with ("Unsupported model IR version: 12, max supported IR version: 11"), and one whose
default-domain opset is newer than it implements, whatever the model does. :data:`READS`
was measured by loading models of each IR version and opset in each release's Linux wheel
(1.15 to 1.32); the rows before 1.15 are ONNX Runtime's compatibility table. A device on
Python 3.10 stops at 1.23, the last release with a 3.10 wheel: IR 11, opset 23.

The IR version a file carries is the one its exporter's onnx package wrote (onnx 1.23 writes
14), not the one its content needs: a model of opset 17 whose tensors are of types IR 8
already had reads the same at IR 8. :func:`lowest_ir_version` says what the content needs
(from its opsets, data types and functions); :func:`write_lowered` copies a file with only
that header field rewritten, the graph and weights byte for byte, without parsing them.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
import onnxruntime as ort
from onnx import helper

from controller.variants import version_tuple

# (release, newest default-domain opset it implements, newest IR version it reads), oldest first.
READS: tuple[tuple[str, int, int], ...] = (
    ("1.3", 12, 6),
    ("1.6", 13, 7),
    ("1.8", 14, 7),
    ("1.10", 15, 8),
    ("1.11", 16, 8),
    ("1.12", 17, 8),
    ("1.14", 18, 8),
    ("1.15", 19, 9),
    ("1.17", 20, 9),
    ("1.18", 21, 10),
    ("1.21", 22, 10),
    ("1.23", 23, 11),
    ("1.24", 25, 13),
    ("1.26", 26, 13),
    ("1.32", 26, 14),
)

# The oldest release the agent installs (its dependency onnxruntime>=1.20): every device reads
# what this one reads, so only a file stating a newer IR version gets a lowered copy.
OLDEST_ONNXRUNTIME = "1.20"

# Tensor element types that came with an IR version (onnx's IR.md): float8 in 9, 4-bit
# integers in 10, float4 in 11. A type newer than these keeps the file's own IR version.
_TYPE_IR: dict[int, int] = {
    onnx.TensorProto.FLOAT8E4M3FN: 9,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 9,
    onnx.TensorProto.FLOAT8E5M2: 9,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 9,
    onnx.TensorProto.UINT4: 10,
    onnx.TensorProto.INT4: 10,
    onnx.TensorProto.FLOAT4E2M1: 11,
}
_KNOWN_TYPES = max(_TYPE_IR)
# Model-local functions came with IR 8, their overloads with IR 10.
FUNCTIONS_IR, OVERLOAD_IR = 8, 10
_TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype", "output_datatype")


def max_ir_version(onnxruntime: str) -> int | None:
    """The newest ONNX IR version that ONNX Runtime ``onnxruntime`` reads; None for a release
    newer than :data:`READS` knows (it reads at least as much as the newest row, maybe more)."""
    installed = version_tuple(onnxruntime)
    if installed > version_tuple(READS[-1][0]) and installed[:2] != version_tuple(READS[-1][0])[:2]:
        return None
    found = [ir for release, _, ir in READS if version_tuple(release) <= installed]
    return found[-1] if found else READS[0][2]


def min_onnxruntime(opset: int, ir_version: int = 0) -> str:
    """The oldest ONNX Runtime release that reads a model of this opset and IR version; past
    what :data:`READS` knows, the controller's own release (the upload check ran it there)."""
    for release, max_opset, max_ir in READS:
        if opset <= max_opset and ir_version <= max_ir:
            return release
    return ".".join(ort.__version__.split(".")[:2])


def lowest_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version the model's content needs: what its opsets need (onnx's version
    table), what its tensor types and functions need; never above its own. A default-domain
    opset or a type the installed onnx does not know keeps the model's own IR version."""
    own = int(model.ir_version)
    try:
        need = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except ValueError:
        return own
    known_opset = max(row[2] for row in helper.VERSION_TABLE)
    if any(o.domain in ("", "ai.onnx") and o.version > known_opset for o in model.opset_import):
        return own
    if model.functions:
        need = max(need, FUNCTIONS_IR)
    if any(f.overload for f in model.functions) or any(n.overload for n in _nodes(model)):
        need = max(need, OVERLOAD_IR)
    for t in _types(model):
        if t > _KNOWN_TYPES:
            return own
        need = max(need, _TYPE_IR.get(t, 0))
    return min(need, own) if own else need


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _graphs(sub)


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from _graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                    yield from _graphs(sub)


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in _all_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _types(model: onnx.ModelProto) -> Iterator[int]:
    """Every tensor element type the model names: its values, weights, constants and casts."""
    for graph in _all_graphs(model):
        for info in itertools.chain(graph.input, graph.output, graph.value_info):
            yield from _value_types(info.type)
        for tensor in graph.initializer:
            yield tensor.data_type
        for sparse in graph.sparse_initializer:
            yield sparse.values.data_type
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t.data_type
            for tensor in attr.tensors:
                yield tensor.data_type
            if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT:
                yield attr.i


def _value_types(t: onnx.TypeProto) -> Iterator[int]:
    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(t, kind).elem_type
    elif kind in ("sequence_type", "optional_type"):
        yield from _value_types(getattr(t, kind).elem_type)
    elif kind == "map_type":
        yield t.map_type.key_type
        yield from _value_types(t.map_type.value_type)


def lowered_ir(ir_version: int, lowest: int) -> int | None:
    """The IR version a copy of an uploaded file stating ``ir_version``, whose content needs
    ``lowest``, is given; None when no copy helps: every supported release reads the file as it
    is, or its content needs the IR version it states."""
    oldest = max_ir_version(OLDEST_ONNXRUNTIME)
    if oldest is None or ir_version <= oldest or lowest >= ir_version:
        return None
    return lowest


def lower_in_place(path: Path) -> None:
    """A file the controller wrote (a quantized variant: the quantizers keep the IR version of
    the file they read) rewritten at the lowest IR version its content needs."""
    model = onnx.load(str(path), load_external_data=False)
    lowest = lowest_ir_version(model)
    if lowest >= model.ir_version:
        return
    del model
    lowered = path.with_name(f".{path.name}.lowered")
    try:
        write_lowered(path, lowered, lowest)
        os.replace(lowered, path)
    finally:
        lowered.unlink(missing_ok=True)


# -- the header field, read and rewritten without parsing the graph ----------------------

_IR_FIELD = 1  # ModelProto.ir_version, a varint
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(f: BinaryIO) -> int | None:
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes: not an ONNX file")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        if value < 0x80:
            out.append(value)
            return bytes(out)
        out.append((value & 0x7F) | 0x80)
        value >>= 7


def _ir_field(f: BinaryIO) -> tuple[int, int, int] | None:
    """(start, end, value) of the top-level ir_version field, skipping the others by their
    length (the graph is never read); None when the file has none."""
    while True:
        start = f.tell()
        key = _varint(f)
        if key is None:
            return None
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value = _varint(f)
            if value is None:
                raise ValueError("the file ends inside a field: not an ONNX file")
            if field == _IR_FIELD:
                return start, f.tell(), value
        elif wire == _LENGTH:
            length = _varint(f)
            if length is None:
                raise ValueError("the file ends inside a field: not an ONNX file")
            f.seek(length, 1)
        elif wire in (_FIXED64, _FIXED32):
            f.seek(8 if wire == _FIXED64 else 4, 1)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {start}: not an ONNX file")


def ir_version_of(path: Path) -> int:
    """The IR version an ONNX file's header states (0 when it states none)."""
    with path.open("rb") as f:
        found = _ir_field(f)
    return found[2] if found is not None else 0


def write_lowered(source: Path, target: Path, ir_version: int) -> None:
    """``source`` copied to ``target`` with its IR version set to ``ir_version``; every other
    byte as it was (a field's position does not matter to protobuf, its value does)."""
    with source.open("rb") as f, target.open("wb") as out:
        found = _ir_field(f)
        if found is None:
            raise ValueError(f"{source.name} states no IR version")
        start, end, _ = found
        f.seek(0)
        out.write(f.read(start))
        out.write(_encode_varint(_IR_FIELD << 3 | _VARINT) + _encode_varint(ir_version))
        f.seek(end)
        shutil.copyfileobj(f, out, 1 << 20)
