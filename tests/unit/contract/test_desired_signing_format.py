"""The bytes a desired state's signature covers: every field of the state but the signature
itself, the same on both halves whatever order maps were filled in, and stable across a trip
over the wire, including one through an agent that does not know a newer controller's fields."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.signing import DESIRED_PREFIX, desired_bytes


def full_state() -> fleet_pb2.DesiredState:
    return fleet_pb2.DesiredState(
        device_id="dev-a",
        generation=7,
        issued_at_ms=1_700_000_000_000,
        models=[
            fleet_pb2.ModelAssignment(
                tenant="cam", model_name="det", model_version="3", artifact_digest="a" * 64,
                artifact_size=1234, format="onnx", runtime="onnxruntime", variant="onnx-fp32",
                signature=b"s" * 64, key_id="k1",
            )
        ],
        tenants=[fleet_pb2.TenantSpec(tenant="cam", model_name="det", preprocess={"resize": "32,32", "layout": "nchw"})],
        drift_specs=[fleet_pb2.DriftSpec(tenant="cam", model_name="det", model_version="3", num_classes=10)],
        capture_policies=[fleet_pb2.CapturePolicy(tenant="cam", model_name="det", policy_id="p", random_fraction=0.1)],
        key_rotation=fleet_pb2.KeyRotation(new_public_key=b"n" * 32, new_key_id="k2", signature=b"r" * 64),
        earlier_rotations=[fleet_pb2.KeyRotation(new_public_key=b"o" * 32, signature=b"q" * 64)],
    )  # fmt: skip


def _models(s: fleet_pb2.DesiredState) -> None:
    s.models[0].model_version = "4"


def _removal(s: fleet_pb2.DesiredState) -> None:
    del s.models[:]


def _tenants(s: fleet_pb2.DesiredState) -> None:
    s.tenants[0].preprocess["resize"] = "64,64"


def _drift(s: fleet_pb2.DesiredState) -> None:
    s.drift_specs[0].num_classes = 11


def _capture(s: fleet_pb2.DesiredState) -> None:
    s.capture_policies[0].random_fraction = 1.0


def _rotation(s: fleet_pb2.DesiredState) -> None:
    s.key_rotation.new_public_key = b"m" * 32


def _earlier(s: fleet_pb2.DesiredState) -> None:
    del s.earlier_rotations[:]


CHANGES: dict[str, Callable[[fleet_pb2.DesiredState], None]] = {
    "device_id": lambda s: setattr(s, "device_id", "dev-b"),
    "generation": lambda s: setattr(s, "generation", 2**64 - 1),
    "issued_at_ms": lambda s: setattr(s, "issued_at_ms", 0),
    "assignment": _models,
    "removal": _removal,
    "tenants": _tenants,
    "drift_specs": _drift,
    "capture_policies": _capture,
    "key_rotation": _rotation,
    "earlier_rotations": _earlier,
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_part_of_the_state_is_covered(field: str) -> None:
    changed = full_state()
    CHANGES[field](changed)
    assert desired_bytes(changed) != desired_bytes(full_state())


def test_the_signature_fields_are_not_covered_and_the_state_is_left_as_it_was() -> None:
    state = full_state()
    unsigned = desired_bytes(state)
    state.state_signature, state.state_key_id = b"x" * 64, "0123456789abcdef"
    assert desired_bytes(state) == unsigned
    assert state.state_signature == b"x" * 64  # the caller's message keeps its signature
    assert unsigned.startswith(DESIRED_PREFIX + b"\x00")


def test_map_insertion_order_does_not_change_the_bytes() -> None:
    a, b = full_state(), full_state()
    for s, order in ((a, ["x", "y", "z"]), (b, ["z", "y", "x"])):
        s.tenants[0].preprocess.clear()
        for k in order:
            s.tenants[0].preprocess[k] = k.upper()
    assert desired_bytes(a) == desired_bytes(b)


def test_the_bytes_survive_the_wire() -> None:
    state = full_state()
    state.state_signature = b"x" * 64
    received = fleet_pb2.DesiredState.FromString(state.SerializeToString())
    assert desired_bytes(received) == desired_bytes(state)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def test_an_agent_rebuilds_the_bytes_of_a_newer_controller_whose_fields_it_does_not_know() -> None:
    # What a newer controller would serialize: a TenantSpec field 30 and a DesiredState field 99,
    # numbered above every field their messages have, each in field-number order.
    tenant = fleet_pb2.TenantSpec(tenant="cam", preprocess={"b": "1", "a": "2"}).SerializeToString(
        deterministic=True
    )
    tenant += _field(30, 2) + b"\x03new"
    newer = (
        _field(1, 2) + b"\x05dev-a" + _field(2, 0) + b"\x09"
        + _field(50, 2) + _varint(len(tenant)) + tenant
        + _field(99, 0) + b"\x01"
    )  # fmt: skip
    parsed = fleet_pb2.DesiredState.FromString(newer)
    assert parsed.generation == 9 and parsed.tenants[0].tenant == "cam"
    assert desired_bytes(parsed) == DESIRED_PREFIX + b"\x00" + newer
