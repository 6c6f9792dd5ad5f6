"""The controller's Ed25519 signing key: created once, kept mode 0600 in ``DATA/signing/``.

Every variant's manifest (name, version, variant, sha256, size, in the byte
format of :mod:`edgefleet_proto.signing`) is signed with it; agents pin the
public key at provisioning. Rotation writes a new key and a
:class:`~edgefleet_proto.fleet_pb2.KeyRotation` signed by the old one, which
travels in every assignment signed with the new key so that a device offline
during the rotation still learns the new key from the key it trusts. Every
rotation is kept (``rotations.pb``, oldest first) and the earlier links travel
too: a device provisioned three keys ago walks the chain one verified link at a
time instead of having to be re-provisioned.

Every desired state is signed whole as it is published (:meth:`Signer.sign_desired`,
byte format :func:`edgefleet_proto.signing.desired_bytes`): generation, device,
assignments, tenants, drift specs, capture policies and removals (what a state no
longer lists). The state carries the rotation chain that leads to the signing key,
so a device pinning an older key verifies it; states are stored unsigned and
signed again at every publication, so a republished state is always signed by the
current key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode
from edgefleet_proto.signing import desired_bytes, key_id, manifest_bytes, rotation_bytes

from controller.errors import SigningKeyError
from controller.files import atomic_write

log = logging.getLogger(__name__)

KEY_FILE = "ed25519.key"
ROTATION_FILE = "rotation.pb"
CHAIN_FILE = "rotations.pb"


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Signer:
    """The current key of one data folder, and the rotation that introduced it (if any)."""

    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        rotation: fleet_pb2.KeyRotation | None,
        earlier: tuple[fleet_pb2.KeyRotation, ...] = (),
    ) -> None:
        self.directory = directory
        self._key = key
        self.public_key = public_bytes(key.public_key())
        self.key_id = key_id(self.public_key)
        self.rotation = rotation
        # The rotations before `rotation`, oldest first.
        self.earlier_rotations = earlier

    @classmethod
    def load_or_create(cls, directory: Path) -> Signer:
        path = directory / KEY_FILE
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            atomic_write(path, _private_bytes(Ed25519PrivateKey.generate()), mode=0o600)
            log.info("signing key created path=%s", path)
        rotation = _load_rotation(directory / ROTATION_FILE)
        chain = _load_chain(directory / CHAIN_FILE)
        # A data folder from before the chain was kept, or a crash between writing
        # the chain and the rotation record: the chain is cut to end at the record.
        chain = chain[: chain.index(rotation)] if rotation is not None and rotation in chain else []
        return cls(directory, _load_key(path), rotation, tuple(chain))

    @property
    def public_key_hex(self) -> str:
        return self.public_key.hex()

    def sign_manifest(self, name: str, version: str, variant: str, digest: str, size: int) -> bytes:
        return self._key.sign(manifest_bytes(name, version, variant, digest, size))

    def sign_desired(self, state: fleet_pb2.DesiredState) -> fleet_pb2.DesiredState:
        """``state`` signed whole with the current key, with the rotations that lead to that key."""
        signed = fleet_pb2.DesiredState()
        signed.CopyFrom(state)
        signed.ClearField("key_rotation")
        signed.ClearField("earlier_rotations")
        if self.rotation is not None:
            signed.key_rotation.CopyFrom(self.rotation)
            signed.earlier_rotations.extend(self.earlier_rotations)
        signed.state_key_id = self.key_id
        signed.state_signature = self._key.sign(desired_bytes(signed))
        return signed

    def sign_desired_payload(self, device_id: str, payload: bytes) -> bytes:
        """A stored desired state, bound to ``device_id`` (the device whose topic it goes to) and signed."""
        try:
            state = decode_as(fleet_pb2.DesiredState, payload)
        except PayloadError as exc:
            raise SigningKeyError(f"cannot sign the desired state of {device_id}: {exc}") from None
        state.device_id = device_id
        return encode(self.sign_desired(state))

    def rotate(self) -> Signer:
        """A new key, announced by a rotation the current key signs; the old key is kept aside."""
        new = Ed25519PrivateKey.generate()
        new_public = public_bytes(new.public_key())
        rotation = fleet_pb2.KeyRotation(
            new_public_key=new_public,
            new_key_id=key_id(new_public),
            old_key_id=self.key_id,
            signature=self._key.sign(rotation_bytes(new_public)),
        )
        atomic_write(self.directory / f"{KEY_FILE}.{self.key_id}", _private_bytes(self._key), mode=0o600)
        earlier = (*self.earlier_rotations, self.rotation) if self.rotation is not None else ()
        # Chain, then rotation record, then key: a crash between any two writes leaves
        # the old key in place with records the agents would reject, never a key they
        # cannot learn; a chain longer than the record is cut back on load.
        chain = fleet_pb2.KeyRotationChain(rotations=[*earlier, rotation])
        atomic_write(self.directory / CHAIN_FILE, encode(chain), mode=0o600)
        atomic_write(self.directory / ROTATION_FILE, encode(rotation), mode=0o600)
        atomic_write(self.directory / KEY_FILE, _private_bytes(new), mode=0o600)
        log.info("signing key rotated old_key=%s new_key=%s", self.key_id, rotation.new_key_id)
        return Signer(self.directory, new, rotation, earlier)


def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return key


def _load_chain(path: Path) -> list[fleet_pb2.KeyRotation]:
    try:
        return list(decode_as(fleet_pb2.KeyRotationChain, path.read_bytes()).rotations)
    except FileNotFoundError:
        return []
    except (OSError, PayloadError) as exc:
        raise SigningKeyError(f"cannot read {path}: {exc}") from None


def _load_rotation(path: Path) -> fleet_pb2.KeyRotation | None:
    try:
        return decode_as(fleet_pb2.KeyRotation, path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, PayloadError) as exc:
        raise SigningKeyError(f"cannot read {path}: {exc}") from None
