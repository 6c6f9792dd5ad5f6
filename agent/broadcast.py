"""Wave broadcast on the device: where an assignment's artifacts are broadcast, and opening what comes.

A rollout wave may send its artifacts once to all its devices (edgefleet_proto.wave):
the assignment names the wave and carries each artifact's key inside the signed desired
state. The device subscribes to the artifact's wave topic, takes the sealed manifest from
the retained announcement, tells the controller it listens, and writes every chunk that
opens (AES-256-GCM, nonce and associated data bound to digest, chunk size and index) and
matches the manifest's sha256 into its download, as a requested chunk would be. What it
lacks when the broadcast says ``done``, or after ``request_timeout_s`` without a word from
it, it asks for by request.

The planner's helpers here are pure; opening imports the AEAD code only when a broadcast
arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import PayloadError, decode_as
from edgefleet_proto.wave import (
    KEY_BYTES,
    NONCE_BYTES,
    WaveError,
    WaveTopic,
    chunk_aad,
    chunk_nonce,
    manifest_aad,
)

from agent.errors import SealRejected
from agent.state import Assignment

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM


@dataclass(frozen=True)
class Reception:
    """The broadcast one artifact of an assignment can be taken from."""

    topic: str
    key: bytes


def reception(a: Assignment, sample: bool = False) -> Reception | None:
    """Where the model (or its sample inputs) of ``a`` is broadcast; None: fetched by request only,
    as is an assignment whose wave or key is malformed (its broadcast could not be opened)."""
    key_hex = a.sample_key if sample else a.artifact_key
    if not a.wave_id or not key_hex:
        return None
    try:
        key = bytes.fromhex(key_hex)
        topic = WaveTopic(a.wave_id, a.sample_digest if sample else a.digest)
    except (ValueError, WaveError):
        return None
    if len(key) != KEY_BYTES:
        return None
    return Reception(str(topic), key)


def _aead(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def open_manifest(
    key: bytes, digest: str, announcement: artifact_pb2.WaveAnnouncement
) -> artifact_pb2.ArtifactManifest:
    """The manifest an announcement seals; SealRejected when it does not open or is not this artifact's."""
    from cryptography.exceptions import InvalidTag

    if len(announcement.nonce) != NONCE_BYTES:
        raise SealRejected(f"announcement nonce has {len(announcement.nonce)} bytes, not {NONCE_BYTES}")
    try:
        plain = _aead(key).decrypt(announcement.nonce, announcement.sealed_manifest, manifest_aad(digest))
    except InvalidTag:
        raise SealRejected(f"the manifest of broadcast {digest[:12]} does not open with its key") from None
    try:
        return decode_as(artifact_pb2.ArtifactManifest, plain)
    except PayloadError as exc:
        raise SealRejected(f"the manifest of broadcast {digest[:12]} is malformed: {exc}") from None


def open_chunk(key: bytes, digest: str, chunk_size: int, chunk: artifact_pb2.SealedChunk) -> bytes:
    """Chunk ``chunk.index`` opened; SealRejected when its tag fails (corrupted, or sealed for
    another index, chunk size or artifact and replayed here)."""
    from cryptography.exceptions import InvalidTag

    nonce = chunk_nonce(digest, chunk_size, chunk.index)
    try:
        return bytes(_aead(key).decrypt(nonce, chunk.sealed, chunk_aad(digest, chunk_size, chunk.index)))
    except InvalidTag:
        raise SealRejected(
            f"broadcast chunk {chunk.index} of {digest[:12]} does not open: corrupted, or sealed for "
            "another chunk or artifact"
        ) from None
