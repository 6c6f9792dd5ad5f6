"""Wire Tensor (dtype name, shape, C-order little-endian bytes) <-> numpy. Pure code."""

from __future__ import annotations

import math

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


def dtype_name(dtype: np.dtype) -> str | None:
    """The wire name of a native-order dtype (a byte-swapped one by its name); None if none."""
    name = _NAMES.get(dtype)
    if name is None and dtype.name in DTYPES:
        name = dtype.name
    return name


def to_numpy(tensor: inference_pb2.Tensor, name: str = "tensor", writable: bool = True) -> np.ndarray:
    """The tensor as an array; with ``writable`` False, a read-only view of the message's bytes
    (no copy) where the machine is little-endian, for runtimes that only read their inputs."""
    if tensor.dtype not in DTYPES:
        raise TensorCodecError(
            f"{name}: unknown dtype {tensor.dtype!r}; use one of {', '.join(sorted(DTYPES))}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorCodecError(f"{name}: rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"{name}: negative dimension in shape {list(shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(tensor.data):
        raise TensorCodecError(
            f"{name}: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    # A writable native-order copy unless asked otherwise: some callers write into their inputs.
    return array.astype(np.dtype(tensor.dtype), copy=writable)


def from_numpy(array: np.ndarray, name: str = "tensor") -> inference_pb2.Tensor:
    tensor = inference_pb2.Tensor()
    fill(tensor, array, name)
    return tensor


def fill(tensor: inference_pb2.Tensor, array: np.ndarray, name: str = "tensor") -> None:
    """Write ``array`` into an empty ``tensor`` in place (a response's map entry: no CopyFrom)."""
    dtype = dtype_name(array.dtype)
    if dtype is None:
        raise TensorCodecError(f"{name}: dtype {array.dtype} cannot travel as a Tensor")
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    tensor.dtype = dtype
    tensor.shape.extend(array.shape)
    tensor.data = wire.tobytes()
