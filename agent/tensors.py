"""Wire Tensor (dtype name, shape, C-order little-endian bytes) <-> numpy. Pure code."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, MutableMapping

import numpy as np
from edgefleet_proto import inference_pb2

from agent.errors import TensorCodecError

DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_RANK = 32


# Looked up by dtype, not read from ``dtype.name``: numpy builds that name in Python (~3 us).
_NAMES = {np.dtype(d): d for d in DTYPES}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _decoding(name: str) -> tuple[np.dtype, np.dtype]:
    """The dtype a caller gets and the one the wire's bytes are read as: the same object on a
    little-endian machine, so a read-only decode is a view with no conversion."""
    native = np.dtype(name)
    wire = native.newbyteorder("<")
    return native, native if wire == native else wire


# Per wire name, worked out once: numpy parses a dtype name anew on every np.dtype(name).
_DECODE = {d: _decoding(d) for d in DTYPES}


def dtype_name(dtype: np.dtype) -> str | None:
    """The wire name of a native-order dtype (a byte-swapped one by its name); None if none."""
    name = _NAMES.get(dtype)
    if name is None and dtype.name in DTYPES:
        name = dtype.name
    return name


class _Malformed(Exception):
    """What is wrong with a tensor; the caller puts its own name for the tensor in front."""


def to_numpy(tensor: inference_pb2.Tensor, name: str = "tensor", writable: bool = True) -> np.ndarray:
    """The tensor as an array; with ``writable`` False, a read-only view of the message's bytes
    (no copy) where the machine is little-endian, for runtimes that only read their inputs."""
    try:
        return _decode(tensor, writable)
    except _Malformed as exc:
        raise TensorCodecError(f"{name}: {exc}") from None


def to_arrays(
    tensors: Mapping[str, inference_pb2.Tensor], role: str = "tensor", writable: bool = True
) -> dict[str, np.ndarray]:
    """Each named tensor as an array (as :func:`to_numpy`), in a new dict; a malformed one is
    refused as ``{role} {name!r}: ...`` (the label is made only then, not per call)."""
    arrays: dict[str, np.ndarray] = {}
    # By key: a message map's items() is a Python-level generator.
    for name in tensors:
        try:
            arrays[name] = _decode(tensors[name], writable)
        except _Malformed as exc:
            raise TensorCodecError(f"{role} {name!r}: {exc}") from None
    return arrays


def _decode(tensor: inference_pb2.Tensor, writable: bool) -> np.ndarray:
    dtypes = _DECODE.get(tensor.dtype)
    if dtypes is None:
        raise _Malformed(f"unknown dtype {tensor.dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    native, wire = dtypes
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise _Malformed(f"rank {len(shape)} exceeds {MAX_RANK}")
    if shape and min(shape) < 0:
        raise _Malformed(f"negative dimension in shape {list(shape)}")
    data = tensor.data
    expected = math.prod(shape) * wire.itemsize
    if expected != len(data):
        raise _Malformed(f"shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(data)}")
    try:
        # Over immutable bytes: read-only, C-ordered, no copy.
        array: np.ndarray = np.ndarray(shape, wire, data)
    except ValueError as exc:
        # Dimensions whose product is 0 (so the byte count matched) but too large for numpy.
        raise _Malformed(f"shape {list(shape)} cannot be an array: {exc}") from None
    if wire is native and not writable:
        return array
    # A writable native-order copy unless asked otherwise: some callers write into their inputs.
    return array.astype(native, copy=writable)


def from_numpy(array: np.ndarray, name: str = "tensor") -> inference_pb2.Tensor:
    tensor = inference_pb2.Tensor()
    fill(tensor, array, name)
    return tensor


def from_arrays(arrays: Mapping[str, np.ndarray], role: str = "tensor") -> dict[str, inference_pb2.Tensor]:
    """Each named array as a tensor (as :func:`from_numpy`), for a request's map; the inverse of
    :func:`to_arrays`."""
    return {name: from_numpy(array, f"{role} {name!r}") for name, array in arrays.items()}


def fill(tensor: inference_pb2.Tensor, array: np.ndarray, name: str = "tensor") -> None:
    """Write ``array`` into an empty ``tensor`` in place (a response's map entry: no CopyFrom)."""
    try:
        _encode(tensor, array)
    except _Malformed as exc:
        raise TensorCodecError(f"{name}: {exc}") from None


def fill_all(
    tensors: MutableMapping[str, inference_pb2.Tensor], arrays: Mapping[str, np.ndarray], role: str = "tensor"
) -> None:
    """Write each array into the message map ``tensors`` under its name (as :func:`fill`); one
    that cannot travel is refused as ``{role} {name!r}: ...``."""
    for name, array in arrays.items():
        try:
            _encode(tensors[name], array)
        except _Malformed as exc:
            raise TensorCodecError(f"{role} {name!r}: {exc}") from None


def _encode(tensor: inference_pb2.Tensor, array: np.ndarray) -> None:
    dtype = _NAMES.get(array.dtype)
    if dtype is not None and _LITTLE_ENDIAN:
        # Native order is the wire's; tobytes() writes C order whatever the array's strides.
        data = array.tobytes()
    else:
        dtype = dtype_name(array.dtype)
        if dtype is None:
            raise _Malformed(f"dtype {array.dtype} cannot travel as a Tensor")
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    tensor.dtype = dtype
    tensor.shape.extend(array.shape)
    tensor.data = data
