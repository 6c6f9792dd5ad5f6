from __future__ import annotations

import numpy as np
import pytest
from edgefleet_proto import inference_pb2

from agent.errors import TensorCodecError
from agent.tensors import DTYPES, fill_all, from_arrays, from_numpy, to_arrays, to_numpy


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_every_dtype(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    wire = from_numpy(array)
    assert (wire.dtype, list(wire.shape), len(wire.data)) == (dtype, [2, 3, 4], array.nbytes)
    back = to_numpy(wire)
    assert back.dtype == array.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, array)


def test_non_contiguous_and_scalar_arrays() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(to_numpy(from_numpy(array)), array)
    scalar = np.array(3.5, dtype=np.float64)
    assert to_numpy(from_numpy(scalar)).shape == ()


def test_wire_bytes_are_little_endian() -> None:
    assert from_numpy(np.array([1], dtype=">i4")).data == b"\x01\0\0\0"


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (inference_pb2.Tensor(dtype="float128", shape=[1], data=b"\0" * 16), "unknown dtype 'float128'"),
        (inference_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "needs 16 bytes, got 15"),
        (inference_pb2.Tensor(dtype="float32", shape=[-1, 2], data=b""), "negative dimension"),
        (inference_pb2.Tensor(dtype="int8", shape=[1] * 33, data=b"\0"), "rank 33"),
        # Zero values, so the byte count matches, but no array can have these dimensions.
        (
            inference_pb2.Tensor(dtype="float32", shape=[2**62, 0], data=b""),
            r"shape \[4611686018427387904, 0\]",
        ),
        (inference_pb2.Tensor(dtype="uint8", shape=[2**40, 2**40, 0], data=b""), "cannot be an array"),
    ],
)
def test_invalid_tensors_are_refused_with_a_reason(tensor: inference_pb2.Tensor, message: str) -> None:
    with pytest.raises(TensorCodecError, match=message):
        to_numpy(tensor, "input 'x'")


def test_object_arrays_cannot_travel() -> None:
    with pytest.raises(TensorCodecError, match="cannot travel"):
        from_numpy(np.array(["a"], dtype=object))


def test_maps_of_tensors_name_the_one_that_is_refused() -> None:
    good = from_numpy(np.ones((2, 3), np.float32))
    arrays = to_arrays({"a": good}, "input", writable=False)
    assert not arrays["a"].flags.writeable and arrays["a"].shape == (2, 3)
    assert to_arrays({"a": good}, "input")["a"].flags.writeable
    bad = inference_pb2.Tensor(dtype="float32", shape=[2], data=b"\0" * 4)
    with pytest.raises(TensorCodecError, match=r"^input 'b': shape \[2\] of float32 needs 8 bytes, got 4$"):
        to_arrays({"a": good, "b": bad}, "input")
    response = inference_pb2.InferResponse()
    fill_all(response.outputs, {"y": np.arange(6, dtype=">i4").reshape(2, 3).T}, "output")
    np.testing.assert_array_equal(to_numpy(response.outputs["y"]), np.arange(6).reshape(2, 3).T)
    with pytest.raises(TensorCodecError, match=r"^output 'z': dtype <U1 cannot travel"):
        fill_all(response.outputs, {"z": np.array(["a"])}, "output")
    request = inference_pb2.InferRequest(inputs=from_arrays({"x": np.eye(2, dtype=np.float16)}, "input"))
    np.testing.assert_array_equal(to_arrays(request.inputs)["x"], np.eye(2, dtype=np.float16))
    with pytest.raises(TensorCodecError, match=r"^input 'z': dtype <U1 cannot travel"):
        from_arrays({"z": np.array(["a"])}, "input")
