"""The agent's pinned controller key: unsigned, tampered and wrongly signed assignments are
refused with the reason; a rotation is accepted only when the pinned key signed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import fleet_pb2
from edgefleet_proto.signing import key_id, manifest_bytes, rotation_bytes

from agent.errors import ConfigError
from agent.signing import KEY_FILE, KeyRing, parse_public_key


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signed(key: Ed25519PrivateKey, digest: str = "a" * 64, size: int = 10) -> fleet_pb2.ModelAssignment:
    m = fleet_pb2.ModelAssignment(
        tenant="default", model_name="m", model_version="1", variant="onnx-int8-static",
        artifact_digest=digest, artifact_size=size, key_id=key_id(raw(key)),
    )  # fmt: skip
    m.signature = key.sign(manifest_bytes("m", "1", "onnx-int8-static", digest, size))
    return m


def rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey) -> fleet_pb2.KeyRotation:
    return fleet_pb2.KeyRotation(
        new_public_key=raw(new), new_key_id=key_id(raw(new)), old_key_id=key_id(raw(old)),
        signature=old.sign(rotation_bytes(raw(new))),
    )  # fmt: skip


CONTROLLER = Ed25519PrivateKey.generate()
FORGER = Ed25519PrivateKey.generate()


def test_only_assignments_signed_by_the_pinned_key_pass(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    good = signed(CONTROLLER)
    assert ring.check(good) is None
    unsigned = fleet_pb2.ModelAssignment()
    unsigned.CopyFrom(good)
    unsigned.ClearField("signature")
    assert ring.check(unsigned) == "refused: the assignment is not signed by the controller"
    tampered = fleet_pb2.ModelAssignment()
    tampered.CopyFrom(good)
    tampered.artifact_digest = "b" * 64  # points the device at another artifact
    assert "does not match the manifest" in str(ring.check(tampered))
    bigger = fleet_pb2.ModelAssignment()
    bigger.CopyFrom(good)
    bigger.artifact_size = 11
    assert ring.check(bigger) is not None
    wrong = signed(FORGER)
    assert (
        ring.check(wrong)
        == f"refused: signed by key {key_id(raw(FORGER))}, this device trusts controller key {ring.key_id}"
    )


def test_refusals_of_a_desired_state_name_each_digest(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    desired = fleet_pb2.DesiredState(models=[signed(CONTROLLER, "a" * 64), signed(FORGER, "c" * 64)])
    assert list(ring.refusals(desired)) == ["c" * 64]


def test_without_a_pinned_key_nothing_is_checked(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, None)
    assert not ring.enabled and ring.check(fleet_pb2.ModelAssignment()) is None


def test_rotation_needs_the_old_keys_signature_and_persists(tmp_path: Path) -> None:
    new, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    forged = rotation(FORGER, other)
    assert "not signed by the pinned controller key" in str(ring.rotate(forged))
    assert ring.key == raw(CONTROLLER) and not (tmp_path / KEY_FILE).exists()
    # The rotation rides on the first assignment signed with the new key.
    assignment = signed(new)
    assignment.key_rotation.CopyFrom(rotation(CONTROLLER, new))
    assert ring.refusals(fleet_pb2.DesiredState(models=[assignment])) == {}
    assert ring.key == raw(new) and ring.check(signed(CONTROLLER)) is not None
    assert json.loads((tmp_path / KEY_FILE).read_text())["public_key"] == raw(new).hex()
    # A restart keeps the rotated key; re-provisioning with another key takes precedence.
    assert KeyRing(tmp_path, raw(CONTROLLER)).key == raw(new)
    assert KeyRing(tmp_path, raw(other)).key == raw(other)


def test_a_device_that_slept_through_two_rotations_walks_the_chain(tmp_path: Path) -> None:
    second, third = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    assignment = signed(third)
    assignment.key_rotation.CopyFrom(rotation(second, third))
    # Without the earlier link the device cannot get from its key to the third.
    assert ring.refusals(fleet_pb2.DesiredState(models=[assignment])) != {}
    assert ring.key == raw(CONTROLLER)
    # A forged earlier link is passed over: the chain still does not reach the pinned key.
    assignment.earlier_rotations.append(rotation(FORGER, second))
    assert ring.refusals(fleet_pb2.DesiredState(models=[assignment])) != {}
    assert ring.key == raw(CONTROLLER)
    del assignment.earlier_rotations[:]
    assignment.earlier_rotations.append(rotation(CONTROLLER, second))
    assert ring.refusals(fleet_pb2.DesiredState(models=[assignment])) == {}
    assert ring.key == raw(third) and KeyRing(tmp_path, raw(CONTROLLER)).key == raw(third)
    # A device already on the second key skips the link it has followed.
    (tmp_path / "b").mkdir()
    on_second = KeyRing(tmp_path / "b", raw(CONTROLLER))
    on_second.rotate(rotation(CONTROLLER, second))
    assert on_second.refusals(fleet_pb2.DesiredState(models=[assignment])) == {}
    assert on_second.key == raw(third)


def test_public_key_text_is_checked() -> None:
    assert parse_public_key(raw(CONTROLLER).hex()) == raw(CONTROLLER)
    with pytest.raises(ConfigError, match="not hex"):
        parse_public_key("zz")
    with pytest.raises(ConfigError, match="has 3 bytes"):
        parse_public_key("abcdef")


def test_the_key_is_read_from_agent_toml_with_line_precise_errors() -> None:
    from agent.config import parse_config

    base = 'device_id = "cam-1"\ndata_dir = "/tmp/x"\n[mqtt]\npassword = "p"\n'
    with pytest.raises(ConfigError, match=r"agent.toml: security.controller_public_key: missing"):
        parse_config(base)
    unsigned = parse_config(base + "[security]\nallow_unsigned = true\n").security
    assert (unsigned.controller_public_key, unsigned.allow_unsigned) == ("", True)
    key = raw(CONTROLLER).hex()
    config = parse_config(base + f'[security]\ncontroller_public_key = "{key.upper()}"\n')
    assert config.security.controller_public_key == key
    with pytest.raises(
        ConfigError, match=r"agent.toml:6: security.controller_public_key: expected 64 hex digits"
    ):
        parse_config(base + '[security]\ncontroller_public_key = "abc"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(base + "[security]\nallow_unsigend = true\n")


def test_what_the_device_already_runs_is_not_checked_again_after_a_rotation(tmp_path: Path) -> None:
    new = Ed25519PrivateKey.generate()
    ring = KeyRing(tmp_path, raw(CONTROLLER))
    running = signed(CONTROLLER, "a" * 64)  # tenant A, accepted before the rotation
    fresh = signed(new, "b" * 64)
    fresh.key_rotation.CopyFrom(rotation(CONTROLLER, new))
    desired = fleet_pb2.DesiredState(models=[running, fresh])
    assert ring.refusals(desired, verified={"a" * 64}) == {}
    assert ring.key == raw(new)
    assert list(ring.refusals(desired)) == ["a" * 64]  # unless it is not running: then it must verify
