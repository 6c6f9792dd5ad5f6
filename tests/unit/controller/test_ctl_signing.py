"""The controller's Ed25519 key: created once with restrictive permissions, signs manifests, rotates."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from edgefleet_proto.signing import key_id, manifest_bytes, rotation_bytes

from controller.errors import SigningKeyError
from controller.signing import KEY_FILE, ROTATION_FILE, Signer, verify


def test_the_key_is_created_once_and_kept_private(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path / "signing")
    key = tmp_path / "signing" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "signing").stat().st_mode) == 0o700
    again = Signer.load_or_create(tmp_path / "signing")
    assert again.public_key == signer.public_key and signer.key_id == key_id(signer.public_key)
    assert len(signer.public_key) == 32 and signer.rotation is None


def test_manifest_signatures_verify_only_for_the_same_fields(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path)
    digest = "0" * 64
    signature = signer.sign_manifest("m", "1", "onnx-fp32", digest, 100)
    assert verify(signer.public_key, signature, manifest_bytes("m", "1", "onnx-fp32", digest, 100))
    for fields in (("m", "2", "onnx-fp32", digest, 100), ("m", "1", "onnx-int8", digest, 100),
                   ("m", "1", "onnx-fp32", "1" * 64, 100), ("m", "1", "onnx-fp32", digest, 101)):  # fmt: skip
        assert not verify(signer.public_key, signature, manifest_bytes(*fields))
    other = Signer.load_or_create(tmp_path / "other")
    assert not verify(other.public_key, signature, manifest_bytes("m", "1", "onnx-fp32", digest, 100))


def test_rotation_is_signed_by_the_old_key_and_survives_a_restart(tmp_path: Path) -> None:
    old = Signer.load_or_create(tmp_path)
    new = old.rotate()
    assert new.public_key != old.public_key
    rotation = new.rotation
    assert rotation is not None and (rotation.old_key_id, rotation.new_key_id) == (old.key_id, new.key_id)
    assert verify(old.public_key, rotation.signature, rotation_bytes(new.public_key))
    assert not verify(new.public_key, rotation.signature, rotation_bytes(new.public_key))
    reloaded = Signer.load_or_create(tmp_path)
    assert reloaded.public_key == new.public_key and reloaded.rotation == rotation
    assert (tmp_path / f"{KEY_FILE}.{old.key_id}").is_file()


def test_every_rotation_is_kept_oldest_first_for_devices_that_missed_some(tmp_path: Path) -> None:
    first = Signer.load_or_create(tmp_path)
    second = first.rotate()
    third = second.rotate()
    assert second.rotation is not None and third.rotation is not None
    assert third.earlier_rotations == (second.rotation,)
    # Each link verifies with the key before it, from the first key to the current one.
    key = first.public_key
    for link in (*third.earlier_rotations, third.rotation):
        assert verify(key, link.signature, rotation_bytes(link.new_public_key))
        key = link.new_public_key
    assert key == third.public_key
    reloaded = Signer.load_or_create(tmp_path)
    assert (reloaded.rotation, reloaded.earlier_rotations) == (third.rotation, (second.rotation,))


def test_a_chain_written_before_a_crash_is_cut_back_to_the_rotation_record(tmp_path: Path) -> None:
    second = Signer.load_or_create(tmp_path).rotate()
    # Simulate a crash after the chain was written and before the record and key were:
    # put back the record and key of `second` over a third rotation's files.
    record = (tmp_path / ROTATION_FILE).read_bytes()
    key = (tmp_path / KEY_FILE).read_bytes()
    second.rotate()
    (tmp_path / ROTATION_FILE).write_bytes(record)
    (tmp_path / KEY_FILE).write_bytes(key)
    reloaded = Signer.load_or_create(tmp_path)
    assert (reloaded.key_id, reloaded.rotation, reloaded.earlier_rotations) == (
        second.key_id,
        second.rotation,
        (),
    )


def test_an_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("garbage")
    with pytest.raises(SigningKeyError, match="cannot read the signing key"):
        Signer.load_or_create(tmp_path)
