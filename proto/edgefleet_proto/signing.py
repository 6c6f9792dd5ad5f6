"""The bytes the controller signs (Ed25519) and the agent verifies.

Both halves must build exactly the same bytes, so the format lives in the
contract: a fixed prefix naming the purpose and version, then the fields as
UTF-8 separated by NUL (no field may contain NUL, so the split is unambiguous).
Signing and verifying themselves need a crypto library and live in each half.

A whole desired state is signed as the prefix, a NUL, then the state's
deterministic protobuf serialization with its signature fields cleared. The
agent re-serializes the state it parsed, so the bytes match as long as both
halves serialize alike: protobuf writes known fields in field-number order and
fields it does not know after them. A field added later to any message of the
desired state must therefore take a number above every field that message
already has, or agents older than it would refuse every state (the numbering
scheme of fleet.proto, blocks of ten per addition, keeps to that).
"""

from __future__ import annotations

import hashlib

from edgefleet_proto import fleet_pb2

MANIFEST_PREFIX = b"edgefleet-manifest/v1"
ROTATION_PREFIX = b"edgefleet-key-rotation/v1"
DESIRED_PREFIX = b"edgefleet-desired/v1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningFormatError(ValueError):
    """A field cannot be put in a signed message."""


def _join(prefix: bytes, fields: list[str]) -> bytes:
    for value in fields:
        if "\x00" in value:
            raise SigningFormatError(f"field {value!r} contains NUL")
    return b"\x00".join([prefix, *(v.encode() for v in fields)])


def manifest_bytes(model_name: str, model_version: str, variant: str, digest: str, size: int) -> bytes:
    """What a variant's signature covers: name, version, variant, sha256 and size."""
    return _join(MANIFEST_PREFIX, [model_name, model_version, variant, digest, str(int(size))])


def rotation_bytes(new_public_key: bytes) -> bytes:
    """What the old key signs to hand over to ``new_public_key``."""
    if len(new_public_key) != PUBLIC_KEY_BYTES:
        raise SigningFormatError(f"a public key has {PUBLIC_KEY_BYTES} bytes, got {len(new_public_key)}")
    return ROTATION_PREFIX + b"\x00" + new_public_key


def desired_bytes(state: fleet_pb2.DesiredState) -> bytes:
    """What a desired state's signature covers: every field but ``state_signature`` and ``state_key_id``."""
    body = fleet_pb2.DesiredState()
    body.CopyFrom(state)
    body.ClearField("state_signature")
    body.ClearField("state_key_id")
    return DESIRED_PREFIX + b"\x00" + body.SerializeToString(deterministic=True)


def key_id(public_key: bytes) -> str:
    """Short name of a raw public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]
