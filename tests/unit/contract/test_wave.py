"""The wave broadcast's topic, the nonce and associated data each half derives alike, and a chunk
sealed by the controller that opens on the device only at its own index of its own artifact."""

from __future__ import annotations

import hashlib
import os

import pytest
from edgefleet_proto import artifact_pb2
from edgefleet_proto.wave import (
    NONCE_BYTES,
    WaveError,
    WaveTopic,
    check_key,
    chunk_aad,
    chunk_nonce,
    manifest_aad,
    rollout_wave,
    wave_id,
)

from agent.broadcast import open_chunk, open_manifest
from agent.errors import SealRejected
from controller.wave_broadcast import seal_announcement, seal_chunk

DIGEST = "ab" * 32
OTHER = "cd" * 32
SAMPLE = "2" * 64
KEY = bytes(range(32))
CHUNK = 1024


def test_a_wave_topic_names_the_wave_and_the_artifact_and_parses_back() -> None:
    topic = WaveTopic(wave_id("0f" * 16, 2), DIGEST)
    assert str(topic) == f"edgefleet/v1/waves/{'0f' * 16}-w3/{DIGEST}"
    assert WaveTopic.parse(str(topic)) == topic
    assert rollout_wave(topic.wave_id) == ("0f" * 16, 2)
    assert rollout_wave("w1") is None and rollout_wave("r-w0") is None and rollout_wave("r-wx") is None


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        (f"edgefleet/v1/devices/w1/{DIGEST}", "not under"),
        ("edgefleet/v1/waves/w1", "names no artifact"),
        (f"edgefleet/v1/waves/+/{DIGEST}", "invalid wave id"),
        (f"edgefleet/v1/waves/a.b/{DIGEST}", "invalid wave id"),
        ("edgefleet/v1/waves/w1/#", "invalid artifact digest"),
        (f"edgefleet/v1/waves/w1/{DIGEST}/extra", "invalid artifact digest"),
    ],
)
def test_foreign_wave_topics_are_refused_with_the_reason(topic: str, reason: str) -> None:
    with pytest.raises(WaveError, match=reason):
        WaveTopic.parse(topic)


def test_each_chunk_position_has_its_own_nonce_and_associated_data() -> None:
    positions = [
        (DIGEST, 65536, 0),
        (DIGEST, 65536, 1),
        (DIGEST, 1024, 0),
        (OTHER, 65536, 0),
        (DIGEST, 65536, 256),
    ]
    nonces = {chunk_nonce(*p) for p in positions}
    aads = {chunk_aad(*p) for p in positions}
    assert len(nonces) == len(aads) == len(positions)
    assert all(len(n) == NONCE_BYTES for n in nonces)
    # Derived, not drawn: both halves compute the same bytes.
    assert chunk_nonce(DIGEST, 65536, 7) == chunk_nonce(DIGEST, 65536, 7)
    assert manifest_aad(DIGEST) != manifest_aad(OTHER)
    assert manifest_aad(DIGEST) not in aads


def test_a_key_has_32_bytes() -> None:
    assert check_key(b"k" * 32) == b"k" * 32
    with pytest.raises(WaveError, match="32 bytes"):
        check_key(b"k" * 16)


def sealed(index: int, data: bytes, digest: str = DIGEST, key: bytes = KEY) -> artifact_pb2.SealedChunk:
    return artifact_pb2.SealedChunk(index=index, sealed=seal_chunk(key, digest, CHUNK, index, data))


def test_a_chunk_opens_at_its_index_only_and_a_tampered_one_not_at_all() -> None:
    chunks = [os.urandom(CHUNK) for _ in range(3)]
    assert open_chunk(KEY, DIGEST, CHUNK, sealed(1, chunks[1])) == chunks[1]
    # Replayed under another index, another artifact or another chunk size; another key.
    replayed = artifact_pb2.SealedChunk(index=2, sealed=sealed(1, chunks[1]).sealed)
    other_artifact = sealed(1, chunks[1], digest="3" * 64)
    for bad, digest, size, key in (
        (replayed, DIGEST, CHUNK, KEY),
        (other_artifact, DIGEST, CHUNK, KEY),
        (sealed(1, chunks[1]), DIGEST, 2 * CHUNK, KEY),
        (sealed(1, chunks[1]), DIGEST, CHUNK, b"k" * 32),
    ):
        with pytest.raises(SealRejected, match="does not open"):
            open_chunk(key, digest, size, bad)
    corrupted = bytearray(sealed(0, chunks[0]).sealed)
    corrupted[100] ^= 1
    with pytest.raises(SealRejected, match="corrupted"):
        open_chunk(KEY, DIGEST, CHUNK, artifact_pb2.SealedChunk(index=0, sealed=bytes(corrupted)))


def test_the_announcement_opens_with_the_artifacts_key_only() -> None:
    manifest = artifact_pb2.ArtifactManifest(
        digest=DIGEST,
        size=CHUNK,
        chunk_size=CHUNK,
        chunk_sha256=[hashlib.sha256(b"x").digest()],
        format="onnx",
    )
    frame = seal_announcement(KEY, manifest, done=True)
    assert frame.digest == DIGEST and frame.announcement.done
    assert open_manifest(KEY, DIGEST, frame.announcement) == manifest
    # Two announcements never share a nonce.
    assert seal_announcement(KEY, manifest, done=True).announcement.nonce != frame.announcement.nonce
    with pytest.raises(SealRejected, match="does not open"):
        open_manifest(b"k" * 32, DIGEST, frame.announcement)
    with pytest.raises(SealRejected, match="does not open"):
        open_manifest(KEY, SAMPLE, frame.announcement)
    with pytest.raises(SealRejected, match="nonce"):
        open_manifest(KEY, DIGEST, artifact_pb2.WaveAnnouncement(nonce=b"n", sealed_manifest=b"x"))
