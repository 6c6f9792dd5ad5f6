from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from controller.artifacts import ArtifactStore, chunk_count
from controller.errors import ArtifactNotFound, TooLargeError

CHUNK = 1024


def put(store: ArtifactStore, data: bytes) -> str:
    with store.stage(io.BytesIO(data), max_bytes=10_000_000) as staged:
        store.commit(staged, "onnx")
        return staged.digest


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_manifest_hashes_every_chunk_and_the_whole(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    store = ArtifactStore(tmp_path, CHUNK)
    digest = put(store, data)
    assert digest == hashlib.sha256(data).hexdigest()
    manifest = store.manifest(digest)
    assert (manifest.digest, manifest.size, manifest.chunk_size, manifest.format) == (
        digest,
        size,
        CHUNK,
        "onnx",
    )
    expected = [hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, size, CHUNK)]
    assert list(manifest.chunk_sha256) == expected
    assert len(expected) == chunk_count(size, CHUNK)
    for index in range(len(expected)):
        chunk = store.read_chunk(digest, index)
        assert (chunk.digest, chunk.index, chunk.offset) == (digest, index, index * CHUNK)
        assert chunk.data == data[index * CHUNK : (index + 1) * CHUNK]
        assert hashlib.sha256(chunk.data).digest() == manifest.chunk_sha256[index]


def test_reading_past_the_last_chunk_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    digest = put(store, b"x" * (2 * CHUNK))
    with pytest.raises(ArtifactNotFound, match="no chunk 2"):
        store.read_chunk(digest, 2)


def test_unknown_and_malformed_digests(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    with pytest.raises(ArtifactNotFound):
        store.manifest("0" * 64)
    with pytest.raises(ArtifactNotFound, match="not a sha256"):
        store.read_chunk("../controller.db", 0)
    assert not store.exists("../../etc/passwd")


def test_staging_without_commit_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    with store.stage(io.BytesIO(b"abc"), max_bytes=100) as staged:
        assert staged.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_upload_over_the_limit_is_cut_off_and_removed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    with pytest.raises(TooLargeError, match="100 bytes"), store.stage(io.BytesIO(b"x" * 101), max_bytes=100):
        pytest.fail("must not get here")
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_cached_on_disk_and_recomputed_for_another_chunk_size(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 5)
    digest = put(ArtifactStore(tmp_path, CHUNK), data)
    assert (tmp_path / f"{digest}.manifest").exists()
    # A fresh store (a restarted controller) reads the cached manifest.
    assert len(ArtifactStore(tmp_path, CHUNK).manifest(digest).chunk_sha256) == 4
    bigger = ArtifactStore(tmp_path, 2 * CHUNK).manifest(digest)
    assert bigger.chunk_size == 2 * CHUNK and len(bigger.chunk_sha256) == 2
    # A lost manifest file is recomputed from the artifact.
    (tmp_path / f"{digest}.manifest").unlink()
    again = ArtifactStore(tmp_path, CHUNK).manifest(digest)
    assert again.chunk_sha256[3] == hashlib.sha256(data[3 * CHUNK :]).digest()


def test_read_chunk_reads_only_that_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    digest = put(store, os.urandom(50 * CHUNK))
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    store.read_chunk(digest, 7)
    assert reads == [CHUNK]


def test_an_artifacts_broadcast_key_is_made_once_kept_beside_it_and_shared_by_stores(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, CHUNK)
    digest = put(store, os.urandom(3 * CHUNK))
    key = store.wave_key(digest)
    assert len(key) == 32 and store.wave_key(digest) == key
    path = tmp_path / f"{digest}.wavekey"
    assert path.read_bytes() == key and path.stat().st_mode & 0o777 == 0o600
    # Another controller on the same folder, or this one restarted, opens the same broadcasts.
    assert ArtifactStore(tmp_path, CHUNK).wave_key(digest) == key
    assert store.wave_key(put(store, os.urandom(CHUNK))) != key
    with pytest.raises(ArtifactNotFound):
        store.wave_key("0" * 64)
