"""Wave broadcast: the topic an artifact is broadcast on and the bytes its sealing is bound to.

A wave sends each of its artifacts once, on ``edgefleet/v1/waves/{wave_id}/{digest}``,
sealed with AES-256-GCM under a random key per artifact (the key travels only in the
signed desired states of the devices assigned the artifact, see ``WaveBroadcast`` in
fleet.proto). Both halves derive the same nonce and associated data here; sealing and
opening need a crypto library and live in each half. Pure code: hashlib only.

The nonce of a chunk is derived from (digest, chunk_size, index): under one key, one
nonce then always seals the same bytes (chunk ``index`` of the artifact cut in chunks of
``chunk_size``), which GCM allows, and a controller whose chunk size changed seals other
bytes under other nonces. The associated data names the same three, so a chunk replayed
under another index, another chunk size or another artifact fails its tag. The manifest
is sealed under a random nonce carried beside it: its bytes are not fixed by the digest.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

WAVES_PREFIX = "edgefleet/v1/waves"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_CHUNK_NONCE = b"edgefleet-wave-chunk-nonce/v1"
_CHUNK_AAD = b"edgefleet-wave-chunk/v1"
_MANIFEST_AAD = b"edgefleet-wave-manifest/v1"
# MQTT levels without wildcards, and nothing a NATS subject would split ('.').
_WAVE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,79}\Z")
_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")


class WaveError(ValueError):
    """A wave id, topic or key that is not part of the contract."""


def wave_id(rollout_id: str, wave: int) -> str:
    """The id of wave ``wave`` (0-based) of a rollout."""
    return validate_wave_id(f"{rollout_id}-w{wave + 1}")


def rollout_wave(value: str) -> tuple[str, int] | None:
    """(rollout id, 0-based wave) of a wave id made by :func:`wave_id`; None for any other."""
    rollout, sep, number = value.rpartition("-w")
    if not sep or not rollout or not number.isdigit() or int(number) < 1:
        return None
    return rollout, int(number) - 1


def validate_wave_id(value: str) -> str:
    if not _WAVE_ID.match(value):
        raise WaveError(f"invalid wave id {value!r}: use 1-80 letters, digits and '-'")
    return value


@dataclass(frozen=True)
class WaveTopic:
    wave_id: str
    digest: str

    def __post_init__(self) -> None:
        validate_wave_id(self.wave_id)
        if not _DIGEST.match(self.digest):
            raise WaveError(f"invalid artifact digest {self.digest!r} in a wave topic")

    def __str__(self) -> str:
        return f"{WAVES_PREFIX}/{self.wave_id}/{self.digest}"

    @classmethod
    def parse(cls, topic: str) -> WaveTopic:
        prefix = WAVES_PREFIX + "/"
        if not topic.startswith(prefix):
            raise WaveError(f"topic {topic!r} is not under {prefix}")
        wave, sep, digest = topic[len(prefix) :].partition("/")
        if not sep:
            raise WaveError(f"topic {topic!r} names no artifact after the wave")
        return cls(wave, digest)


def is_wave_topic(topic: str) -> bool:
    return topic.startswith(WAVES_PREFIX + "/")


def check_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise WaveError(f"a wave key has {KEY_BYTES} bytes, got {len(key)}")
    return key


def _position(digest: str, chunk_size: int, index: int) -> bytes:
    return digest.encode() + struct.pack(">II", chunk_size, index)


def chunk_nonce(digest: str, chunk_size: int, index: int) -> bytes:
    seed = _CHUNK_NONCE + b"\x00" + _position(digest, chunk_size, index)
    return hashlib.sha256(seed).digest()[:NONCE_BYTES]


def chunk_aad(digest: str, chunk_size: int, index: int) -> bytes:
    return _CHUNK_AAD + b"\x00" + _position(digest, chunk_size, index)


def manifest_aad(digest: str) -> bytes:
    return _MANIFEST_AAD + b"\x00" + digest.encode()
