from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from edgefleet_proto import artifact_pb2

from agent.artifacts import ArtifactStore, chunk_count
from agent.errors import ChunkRejected, DigestMismatch, ManifestError

CHUNK = 1000


def manifest_for(data: bytes, digest: str | None = None, chunk: int = CHUNK) -> artifact_pb2.ArtifactManifest:
    return artifact_pb2.ArtifactManifest(
        digest=digest or hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk,
        chunk_sha256=[hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)],
        format="onnx",
    )


def chunk(data: bytes, index: int) -> tuple[int, int, bytes]:
    return index, index * CHUNK, data[index * CHUNK : (index + 1) * CHUNK]


@pytest.fixture
def data() -> bytes:
    return os.urandom(4 * CHUNK + 123)  # the last chunk is short


def test_good_chunks_assemble_into_a_verified_model(tmp_path: Path, data: bytes) -> None:
    store = ArtifactStore(tmp_path)
    m = manifest_for(data)
    dl = store.start(m.digest, m, len(data))
    assert dl.part.stat().st_size == len(data) and dl.chunks == 5 == chunk_count(len(data), CHUNK)
    for i in reversed(range(dl.chunks)):
        store.write_chunk(dl, *chunk(data, i))
    assert dl.complete and dl.bytes_have == len(data)
    path = store.finalize(dl)
    assert path == tmp_path / "models" / f"{m.digest}.onnx"
    assert path.read_bytes() == data
    assert store.installed() == {m.digest: path}
    assert store.pending() == []


@pytest.mark.parametrize(
    ("index", "offset", "mutate", "message"),
    [
        (1, CHUNK, lambda b: bytes([b[0] ^ 1]) + b[1:], "does not match its sha256"),
        (1, CHUNK, lambda b: b[:-1], "has 999 bytes, expected 1000"),
        (1, 0, lambda b: b, "claims offset 0, expected 1000"),
        (9, 9 * CHUNK, lambda b: b, "out of range"),
    ],
)
def test_bad_chunks_are_rejected_and_not_written(
    tmp_path: Path, data: bytes, index: int, offset: int, mutate: object, message: str
) -> None:
    store = ArtifactStore(tmp_path)
    m = manifest_for(data)
    dl = store.start(m.digest, m)
    payload = mutate(data[CHUNK : 2 * CHUNK])  # type: ignore[operator]
    with pytest.raises(ChunkRejected, match=message):
        store.write_chunk(dl, index, offset, payload)
    assert dl.have == set()
    assert dl.part.read_bytes() == b"\0" * len(data)


def test_resume_rehashes_the_partial_file(tmp_path: Path, data: bytes) -> None:
    store = ArtifactStore(tmp_path)
    m = manifest_for(data)
    dl = store.start(m.digest, m)
    store.write_chunk(dl, *chunk(data, 0))
    store.write_chunk(dl, *chunk(data, 3))
    # A torn write of chunk 2 (half its bytes) must not count as present.
    with open(dl.part, "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(data[2 * CHUNK : 2 * CHUNK + 500])

    reopened = ArtifactStore(tmp_path).open(m.digest)
    assert reopened is not None
    assert reopened.have == {0, 3}
    assert reopened.missing() == [1, 2, 4]
    for i in reopened.missing():
        store.write_chunk(reopened, *chunk(data, i))
    assert store.finalize(reopened).read_bytes() == data


def test_resume_with_a_corrupt_manifest_starts_over(tmp_path: Path, data: bytes) -> None:
    store = ArtifactStore(tmp_path)
    m = manifest_for(data)
    dl = store.start(m.digest, m)
    (dl.directory / "manifest.pb").write_bytes(b"\x0a\xff")
    assert store.open(m.digest) is None
    assert store.pending() == []


def test_whole_digest_mismatch_is_fatal_and_discards_the_download(tmp_path: Path, data: bytes) -> None:
    store = ArtifactStore(tmp_path)
    liar = hashlib.sha256(b"something else").hexdigest()
    m = manifest_for(data, digest=liar)
    dl = store.start(liar, m)
    for i in range(dl.chunks):
        store.write_chunk(dl, *chunk(data, i))
    with pytest.raises(DigestMismatch, match=f"expected {liar}") as info:
        store.finalize(dl)
    assert info.value.fatal
    assert store.installed() == {} and store.pending() == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"digest": "0" * 64}, "manifest is for digest"),
        ({"chunk_size": 0}, "chunk_size 0"),
        ({"chunk_sha256": [b"x" * 32]}, "lists 1 chunk hashes"),
        ({"format": "exe"}, "format 'exe'"),
    ],
)
def test_manifest_that_does_not_fit_is_refused(
    tmp_path: Path, data: bytes, edit: dict[str, object], message: str
) -> None:
    m = manifest_for(data)
    digest = m.digest
    for field, value in edit.items():
        if field == "chunk_sha256":
            del m.chunk_sha256[:]
            m.chunk_sha256.extend(value)  # type: ignore[arg-type]
        else:
            setattr(m, field, value)
    with pytest.raises(ManifestError, match=message):
        ArtifactStore(tmp_path).start(digest, m)


def test_manifest_size_must_match_the_assignment(tmp_path: Path, data: bytes) -> None:
    m = manifest_for(data)
    with pytest.raises(ManifestError, match="differs from the assigned size"):
        ArtifactStore(tmp_path).start(m.digest, m, expected_size=len(data) + 1)
