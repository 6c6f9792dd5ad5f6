"""The controller signs each desired state whole as it publishes it: bound to the device whose
topic it goes to, with the current key, carrying the rotations that lead there from any older
key; an agent pinning the first key admits a state signed two rotations later."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.signing import desired_bytes

from agent.signing import KeyRing
from controller.errors import SigningKeyError
from controller.signing import Signer, verify


def stored(device_id: str = "dev-a", generation: int = 3) -> bytes:
    return encode(
        fleet_pb2.DesiredState(
            device_id=device_id,
            generation=generation,
            models=[fleet_pb2.ModelAssignment(tenant="default", model_name="m", model_version="1")],
            tenants=[fleet_pb2.TenantSpec(tenant="default", model_name="m")],
        )
    )


def test_a_published_state_is_signed_whole_for_its_device(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path)
    signed = decode_as(fleet_pb2.DesiredState, signer.sign_desired_payload("dev-a", stored()))
    assert signed.state_key_id == signer.key_id and not signed.HasField("key_rotation")
    assert verify(signer.public_key, signed.state_signature, desired_bytes(signed))
    signed.generation += 1
    assert not verify(signer.public_key, signed.state_signature, desired_bytes(signed))
    # The device is the one whose topic it goes to, whatever the stored state said.
    other = decode_as(fleet_pb2.DesiredState, signer.sign_desired_payload("dev-b", stored("dev-a")))
    assert other.device_id == "dev-b"
    assert verify(signer.public_key, other.state_signature, desired_bytes(other))


def test_an_agent_pinning_the_first_key_admits_a_state_signed_two_rotations_later(tmp_path: Path) -> None:
    first = Signer.load_or_create(tmp_path / "signing")
    third = first.rotate().rotate()
    payload = third.sign_desired_payload("dev-a", stored())
    ring = KeyRing(tmp_path / "agent", first.public_key)
    (tmp_path / "agent").mkdir()
    assert ring.admit(decode_as(fleet_pb2.DesiredState, payload), "dev-a") is None
    assert ring.key == third.public_key
    # A state the previous key signed is refused once the device follows the newest key.
    old = first.sign_desired_payload("dev-a", stored(generation=4))
    assert "signed by key" in str(ring.admit(decode_as(fleet_pb2.DesiredState, old), "dev-a"))


def test_an_unreadable_stored_state_is_not_signed(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot sign the desired state of dev-a"):
        Signer.load_or_create(tmp_path).sign_desired_payload("dev-a", b"\xff\xff\xff")
