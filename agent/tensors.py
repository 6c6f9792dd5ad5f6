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


def to_numpy(tensor: inference_pb2.Tensor, name: str = "tensor") -> np.ndarray:
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
    # A writable native-order copy: runtimes may not accept read-only buffers.
    return array.astype(np.dtype(tensor.dtype), copy=True)


def from_numpy(array: np.ndarray, name: str = "tensor") -> inference_pb2.Tensor:
    if array.dtype.name not in DTYPES:
        raise TensorCodecError(f"{name}: dtype {array.dtype} cannot travel as a Tensor")
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return inference_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=wire.tobytes())
