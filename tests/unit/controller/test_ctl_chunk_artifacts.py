"""Chunks are read from descriptors kept open between requests: what is on disk
now is what gets served, and only a few descriptors stay open. Real files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from controller.artifacts import OPEN_ARTIFACTS, ArtifactStore
from controller.errors import ArtifactNotFound

CHUNK = 1024


def put(store: ArtifactStore, data: bytes) -> str:
    with store.stage(io.BytesIO(data), max_bytes=10_000_000) as staged:
        store.commit(staged, "onnx")
        return staged.digest


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_artifact_replaced_on_disk_is_read_from_the_new_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    data = os.urandom(3 * CHUNK)
    digest = put(store, data)
    assert store.read_chunk(digest, 1).data == data[CHUNK : 2 * CHUNK]
    # Bit rot repaired by putting a good copy in place (a new inode under the same name).
    rotten = bytes(b ^ 0xFF for b in data)
    (tmp_path / "fresh").write_bytes(rotten)
    os.replace(tmp_path / "fresh", tmp_path / digest)
    assert store.read_chunk(digest, 1).data == rotten[CHUNK : 2 * CHUNK]
    # Rewritten in place (same inode): read as it is now, too.
    (tmp_path / digest).write_bytes(data)
    assert store.read_chunk(digest, 2).data == data[2 * CHUNK :]


def test_an_artifact_removed_or_truncated_on_disk_is_not_served(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    data = os.urandom(3 * CHUNK)
    digest = put(store, data)
    assert store.read_chunk(digest, 2).data == data[2 * CHUNK :]
    (tmp_path / digest).write_bytes(data[: 2 * CHUNK + 10])
    with pytest.raises(ArtifactNotFound, match="truncated"):
        store.read_chunk(digest, 2)
    (tmp_path / digest).unlink()
    with pytest.raises(FileNotFoundError):
        store.read_chunk(digest, 0)
    assert not store.exists(digest)


def test_only_a_few_artifacts_stay_open(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    blobs = {put(store, os.urandom(2 * CHUNK + i)): i for i in range(OPEN_ARTIFACTS + 5)}
    before = open_fds()
    for _ in range(2):
        for digest in blobs:
            chunk = store.read_chunk(digest, 1)
            assert chunk.digest == digest and len(chunk.data) == CHUNK
    assert open_fds() - before <= OPEN_ARTIFACTS
    del store
    assert open_fds() <= before
