"""Content-addressed download store: verified chunks, resumable, checked whole.

Layout under ``{data_dir}``::

    downloads/<digest>/manifest.pb     the controller's manifest (atomic write)
    downloads/<digest>/artifact.part   the artifact's final size, allocated up front
    models/<digest>.<format>           verified artifacts, ready to load
    models/<digest>.npz                verified sample inputs of a version (staging smoke test)

There is no bitmap of received chunks to get out of step with the data: which
chunks are present is decided by hashing each chunk range of ``artifact.part``
against ``manifest.chunk_sha256`` when a download is reopened.

A download takes its whole size from the disk when it starts (``posix_fallocate``),
and only when that leaves ``reserve_bytes`` free: a transfer never fills the disk
half way and leaves the agent without room for its state and telemetry. A write
refused for want of space raises :class:`~agent.errors.DiskFull`, which is
transient: the download waits and resumes, it is not refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode

from agent.atomic import fsync_dir, move_atomic, write_atomic
from agent.diskspace import refused_for_space
from agent.errors import ChunkRejected, DigestMismatch, DiskFull, ManifestError

DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
FORMATS = ("onnx", "tflite")
# A version's sample inputs travel like an artifact; the agent reads them as .npz whatever
# format their manifest names (a controller may label them like the model).
SAMPLE_FORMAT = "npz"
STORED = (*FORMATS, SAMPLE_FORMAT)
MAX_CHUNK_SIZE = 1024 * 1024
_READ_BLOCK = 1024 * 1024


def valid_digest(digest: str) -> bool:
    return bool(DIGEST_RE.match(digest))


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


@dataclass
class Download:
    digest: str
    manifest: artifact_pb2.ArtifactManifest
    directory: Path
    have: set[int] = field(default_factory=set)

    @property
    def part(self) -> Path:
        return self.directory / "artifact.part"

    @property
    def chunks(self) -> int:
        return len(self.manifest.chunk_sha256)

    @property
    def size(self) -> int:
        return int(self.manifest.size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        offset = index * self.manifest.chunk_size
        return offset, min(self.size, offset + self.manifest.chunk_size) - offset

    @property
    def bytes_have(self) -> int:
        return sum(self.chunk_range(i)[1] for i in self.have)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if i not in self.have]


def validate_manifest(digest: str, manifest: artifact_pb2.ArtifactManifest, expected_size: int = 0) -> None:
    if manifest.digest != digest:
        raise ManifestError(f"manifest is for digest {manifest.digest!r}, asked for {digest}")
    if expected_size and manifest.size != expected_size:
        raise ManifestError(f"manifest size {manifest.size} differs from the assigned size {expected_size}")
    if not 0 < manifest.chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"manifest chunk_size {manifest.chunk_size} is not in 1..{MAX_CHUNK_SIZE}")
    expected_chunks = chunk_count(manifest.size, manifest.chunk_size)
    if len(manifest.chunk_sha256) != expected_chunks:
        raise ManifestError(
            f"manifest lists {len(manifest.chunk_sha256)} chunk hashes, size {manifest.size} "
            f"with chunk_size {manifest.chunk_size} needs {expected_chunks}"
        )
    if any(len(h) != 32 for h in manifest.chunk_sha256):
        raise ManifestError("manifest chunk_sha256 entries must be 32 raw bytes")
    if manifest.format not in STORED:
        raise ManifestError(f"manifest format {manifest.format!r} is not one of {', '.join(STORED)}")


def check_chunk(download: Download, index: int, offset: int, data: bytes) -> int:
    """Where chunk ``index`` goes in the artifact; ChunkRejected unless it is the manifest's chunk."""
    if not 0 <= index < download.chunks:
        raise ChunkRejected(f"chunk index {index} is out of range 0..{download.chunks - 1}")
    start, length = download.chunk_range(index)
    if offset != start:
        raise ChunkRejected(f"chunk {index} claims offset {offset}, expected {start}")
    if len(data) != length:
        raise ChunkRejected(f"chunk {index} has {len(data)} bytes, expected {length}")
    if hashlib.sha256(data).digest() != download.manifest.chunk_sha256[index]:
        raise ChunkRejected(f"chunk {index} does not match its sha256 in the manifest")
    return start


def check_whole(download: Download, actual: str) -> None:
    """DigestMismatch unless the assembled artifact's sha256 (hex) is the one asked for."""
    if actual != download.digest:
        raise DigestMismatch(
            f"assembled artifact has sha256 {actual}, expected {download.digest}: refusing it"
        )


def _allocate(fd: int, size: int) -> None:
    """Take ``size`` bytes from the disk now; sparse where the file system cannot allocate."""
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


class ArtifactStore:
    def __init__(self, data_dir: Path, reserve_bytes: int = 0) -> None:
        self.reserve_bytes = reserve_bytes
        self.downloads_dir = Path(data_dir) / "downloads"
        self.models_dir = Path(data_dir) / "models"
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)

    def model_path(self, digest: str, fmt: str) -> Path:
        return self.models_dir / f"{digest}.{fmt}"

    def sample_path(self, digest: str) -> Path:
        return self.models_dir / f"{digest}.{SAMPLE_FORMAT}"

    def installed(self) -> dict[str, Path]:
        """Verified models and samples on disk, by digest."""
        found: dict[str, Path] = {}
        for path in self.models_dir.iterdir():
            digest, _, fmt = path.name.partition(".")
            if valid_digest(digest) and fmt in STORED and path.is_file():
                found[digest] = path
        return found

    def pending(self) -> list[str]:
        """Digests with a download folder on disk (possibly without a manifest yet)."""
        return sorted(p.name for p in self.downloads_dir.iterdir() if valid_digest(p.name))

    def open(self, digest: str) -> Download | None:
        """Reopen a download after a restart, re-hashing what is already on disk."""
        directory = self.downloads_dir / digest
        try:
            raw = (directory / "manifest.pb").read_bytes()
            manifest = decode_as(artifact_pb2.ArtifactManifest, raw)
            validate_manifest(digest, manifest)
        except (OSError, PayloadError, ManifestError):
            self.discard(digest)
            return None
        download = Download(digest, manifest, directory)
        if not download.part.exists() or download.part.stat().st_size != download.size:
            with open(download.part, "ab") as f:
                f.truncate(download.size)
        with open(download.part, "rb") as f:
            for index in range(download.chunks):
                offset, length = download.chunk_range(index)
                f.seek(offset)
                if hashlib.sha256(f.read(length)).digest() == manifest.chunk_sha256[index]:
                    download.have.add(index)
        return download

    def start(self, digest: str, manifest: artifact_pb2.ArtifactManifest, expected_size: int = 0) -> Download:
        validate_manifest(digest, manifest, expected_size)
        usage = shutil.disk_usage(self.downloads_dir)
        if manifest.size + self.reserve_bytes > usage.total:
            raise ManifestError(
                f"artifact of {manifest.size} bytes can never fit in {self.downloads_dir}: the disk holds "
                f"{usage.total} bytes, {self.reserve_bytes} of them kept free"
            )
        free = usage.free
        if manifest.size + self.reserve_bytes > free:
            raise DiskFull(
                f"artifact {digest[:12]} of {manifest.size} bytes does not fit in {self.downloads_dir}: "
                f"{free} bytes free, {self.reserve_bytes} kept free"
            )
        directory = self.downloads_dir / digest
        download = Download(digest, manifest, directory)
        try:
            with refused_for_space(f"allocating {manifest.size} bytes for artifact {digest[:12]}"):
                directory.mkdir(exist_ok=True)
                with open(download.part, "wb") as f:
                    _allocate(f.fileno(), download.size)
                write_atomic(directory / "manifest.pb", encode(manifest))
                fsync_dir(self.downloads_dir)
        except DiskFull:
            # Nothing half-allocated stays behind to hold the space.
            self.discard(digest)
            raise
        return download

    def write_chunk(self, download: Download, index: int, offset: int, data: bytes) -> None:
        start = check_chunk(download, index, offset, data)
        with refused_for_space(f"writing chunk {index} of artifact {download.digest[:12]}"):
            fd = os.open(download.part, os.O_WRONLY)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
        download.have.add(index)

    def finalize(self, download: Download, sample: bool = False) -> Path:
        """Check the whole file against the digest and move it into models/ (a sample as .npz)."""
        sha = hashlib.sha256()
        with open(download.part, "rb") as f:
            while block := f.read(_READ_BLOCK):
                sha.update(block)
            os.fsync(f.fileno())
        try:
            check_whole(download, sha.hexdigest())
        except DigestMismatch:
            self.discard(download.digest)
            raise
        target = (
            self.sample_path(download.digest)
            if sample
            else self.model_path(download.digest, download.manifest.format)
        )
        move_atomic(download.part, target)
        self.discard(download.digest)
        return target

    def discard(self, digest: str) -> None:
        if valid_digest(digest):
            shutil.rmtree(self.downloads_dir / digest, ignore_errors=True)

    def remove_model(self, digest: str) -> None:
        """Remove the verified model or sample of ``digest``."""
        for fmt in STORED:
            self.model_path(digest, fmt).unlink(missing_ok=True)
