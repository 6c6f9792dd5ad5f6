"""The agent admits only desired states its pinned controller key signed whole, for this device.

A refused state changes nothing, not even a key rotation it carries; a rotation chain signed
link by link from the pinned key is followed before the state's signature is checked."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import fleet_pb2
from edgefleet_proto.signing import desired_bytes, key_id, rotation_bytes

from agent.signing import KEY_FILE, MAX_CLAIM_CHARS, KeyRing

CONTROLLER = Ed25519PrivateKey.generate()
FORGER = Ed25519PrivateKey.generate()


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey) -> fleet_pb2.KeyRotation:
    return fleet_pb2.KeyRotation(
        new_public_key=raw(new), new_key_id=key_id(raw(new)), signature=old.sign(rotation_bytes(raw(new)))
    )


def state(generation: int = 5, device_id: str = "dev-a") -> fleet_pb2.DesiredState:
    return fleet_pb2.DesiredState(
        device_id=device_id,
        generation=generation,
        models=[fleet_pb2.ModelAssignment(tenant="default", model_name="m", model_version="1")],
        tenants=[fleet_pb2.TenantSpec(tenant="default", model_name="m")],
    )


def sign(key: Ed25519PrivateKey, s: fleet_pb2.DesiredState) -> fleet_pb2.DesiredState:
    s.state_key_id = key_id(raw(key))
    s.state_signature = key.sign(desired_bytes(s))
    return s


def test_a_state_signed_by_the_pinned_key_for_this_device_is_admitted(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assert ring.admit(sign(CONTROLLER, state(2**64 - 1)), "dev-a") is None
    assert not (tmp_path / KEY_FILE).exists()


def test_unsigned_forged_and_tampered_states_are_refused_with_the_reason(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    forged = fleet_pb2.DesiredState(device_id="dev-a", generation=2**64 - 1)
    reason = ring.admit(forged, "dev-a")
    assert reason is not None and "generation 18446744073709551615" in reason
    assert "not signed by the controller" in reason and ring.key_id in reason
    assert f"signed by key {key_id(raw(FORGER))}" in str(ring.admit(sign(FORGER, state()), "dev-a"))
    # The forger claims the controller's key id: the signature itself decides.
    claimed = sign(FORGER, state())
    claimed.state_key_id = ring.key_id
    assert "does not match the state" in str(ring.admit(claimed, "dev-a"))
    tampered = sign(CONTROLLER, state(5))
    tampered.generation = 2**64 - 1
    assert "does not match the state" in str(ring.admit(tampered, "dev-a"))
    removed = sign(CONTROLLER, state(5))
    del removed.models[:]
    assert "does not match the state" in str(ring.admit(removed, "dev-a"))
    assert ring.key == raw(CONTROLLER) and not (tmp_path / KEY_FILE).exists()


def test_a_state_signed_for_another_device_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assert "is for device 'dev-a', this is 'dev-b'" in str(ring.admit(sign(CONTROLLER, state()), "dev-b"))
    assert "names no device" in str(ring.admit(sign(CONTROLLER, state(device_id="")), "dev-b"))


def test_the_rotations_a_state_carries_are_followed_before_its_signature_is_checked(tmp_path: Path) -> None:
    second, third = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    s = state()
    s.earlier_rotations.append(rotation(CONTROLLER, second))
    s.key_rotation.CopyFrom(rotation(second, third))
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assert ring.admit(sign(third, s), "dev-a") is None
    assert ring.key == raw(third)
    assert KeyRing(tmp_path, raw(CONTROLLER)).key == raw(third)  # persisted


def test_a_refused_state_persists_not_even_the_genuine_rotation_it_carries(tmp_path: Path) -> None:
    successor = Ed25519PrivateKey.generate()
    s = state()
    s.key_rotation.CopyFrom(rotation(CONTROLLER, successor))
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assert "signed by key" in str(ring.admit(sign(FORGER, s), "dev-a"))
    assert ring.key == raw(CONTROLLER) and not (tmp_path / KEY_FILE).exists()


def test_a_rotation_riding_on_an_assignment_is_followed_too(tmp_path: Path) -> None:
    successor = Ed25519PrivateKey.generate()
    s = state()
    s.models[0].key_rotation.CopyFrom(rotation(CONTROLLER, successor))
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assert ring.admit(sign(successor, s), "dev-a") is None
    assert ring.key == raw(successor)


def test_without_a_pinned_key_states_are_not_checked(tmp_path: Path) -> None:
    assert KeyRing(tmp_path, None).admit(fleet_pb2.DesiredState(generation=1), "dev-a") is None


def test_what_a_refused_state_claims_is_cut_in_the_reason(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    long = "d" * 100_000
    reason = str(ring.admit(sign(CONTROLLER, state(device_id=long)), "dev-a"))
    assert len(reason) < 300 and "d" * MAX_CLAIM_CHARS in reason
    claimed = sign(FORGER, state())
    claimed.state_key_id = "k" * 100_000
    reason = str(ring.admit(claimed, "dev-a"))
    assert len(reason) < 300 and "k" * MAX_CLAIM_CHARS in reason
