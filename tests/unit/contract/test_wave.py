"""The wave broadcast's topic, and the nonce and associated data each half derives alike."""

from __future__ import annotations

import pytest
from edgefleet_proto.wave import (
    NONCE_BYTES,
    WaveError,
    WaveTopic,
    check_key,
    rollout_wave,
    chunk_aad,
    chunk_nonce,
    manifest_aad,
    wave_id,
)

DIGEST = "ab" * 32
OTHER = "cd" * 32


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
