"""Content-addressed artifact store: ``DATA/artifacts/<sha256>``.

Uploads stream into a temporary file in the same folder, hashed (whole and per
chunk) as they arrive and cut off at a size limit; only a complete, accepted
file is renamed to its digest. The manifest (per-chunk sha256) is computed once
and cached next to the artifact as ``<sha256>.manifest``; serving a chunk reads
exactly that chunk's bytes, from a file descriptor kept open for the artifacts
served last (checked against the path on every read, so an artifact replaced
or removed on disk is never served from a stale descriptor).

An artifact sent by wave broadcast is sealed with a key of its own
(controller.wave_broadcast), kept beside it as ``<sha256>.wavekey`` (mode 0600): made
on first use, never changed, so a device that got it in one desired state can open
every broadcast of the artifact. Controllers sharing the folder agree on it (the first
to link its file in wins).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode
from edgefleet_proto.wave import KEY_BYTES

from controller.errors import ArtifactNotFound, TooLargeError
from controller.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")
_READ_SIZE = 1024 * 1024
# Artifacts kept open for serving chunks: a rollout serves one or a few at a time.
OPEN_ARTIFACTS = 8


def is_digest(value: str) -> bool:
    return bool(_DIGEST.match(value))


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


@dataclass
class StagedArtifact:
    """An upload on disk, hashed, not yet part of the store."""

    path: Path
    digest: str
    size: int
    chunk_sha256: list[bytes]
    chunk_size: int


class _ChunkHasher:
    """Feeds bytes into the whole-file hash and one hash per ``chunk_size`` span."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.whole = hashlib.sha256()
        self.chunks: list[bytes] = []
        self._current = hashlib.sha256()
        self._in_current = 0
        self.size = 0

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk_size - self._in_current)
            self._current.update(view[:take])
            self._in_current += take
            view = view[take:]
            if self._in_current == self.chunk_size:
                self.chunks.append(self._current.digest())
                self._current = hashlib.sha256()
                self._in_current = 0

    def finish(self) -> list[bytes]:
        if self._in_current:
            self.chunks.append(self._current.digest())
            self._current = hashlib.sha256()
            self._in_current = 0
        return self.chunks


class _OpenFiles:
    """Read-only descriptors of the artifacts served last, each with the (device, inode)
    it was opened at. Reads happen under the lock, so a descriptor is never closed
    while another thread reads from it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def pread(self, path: str, length: int, offset: int) -> bytes:
        identity = os.stat(path)
        with self._lock:
            fd = self._current(path, identity.st_dev, identity.st_ino)
            return os.pread(fd, length, offset)

    def _current(self, path: str, dev: int, ino: int) -> int:
        entry = self._fds.get(path)
        if entry is not None and entry[1:] == (dev, ino):
            self._fds.move_to_end(path)
            return entry[0]
        if entry is not None:
            os.close(self._fds.pop(path)[0])
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        self._fds[path] = (fd, st.st_dev, st.st_ino)
        while len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1][0])
        return fd

    def close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1][0])


class ArtifactStore:
    def __init__(self, root: Path, chunk_size: int) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifests: dict[str, artifact_pb2.ArtifactManifest] = {}
        self._wave_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._open = _OpenFiles(OPEN_ARTIFACTS)
        weakref.finalize(self, self._open.close)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ArtifactNotFound(f"{digest!r} is not a sha256 digest")
        return self.root / digest

    def _manifest_path(self, digest: str) -> Path:
        return self.root / f"{digest}.manifest"

    def exists(self, digest: str) -> bool:
        # Asked for every chunk request: os.path, not pathlib.
        return is_digest(digest) and os.path.isfile(os.path.join(self.root, digest))

    @contextmanager
    def stage(self, source: BinaryIO, max_bytes: int) -> Iterator[StagedArtifact]:
        """Copy ``source`` into a temporary file; removed on exit unless :meth:`commit` ran."""
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=self.root)
        tmp = Path(tmp_name)
        try:
            hasher = _ChunkHasher(self.chunk_size)
            with os.fdopen(fd, "wb") as out:
                while data := source.read(_READ_SIZE):
                    if hasher.size + len(data) > max_bytes:
                        raise TooLargeError(f"upload exceeds the limit of {max_bytes} bytes")
                    hasher.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            staged = StagedArtifact(
                path=tmp,
                digest=hasher.whole.hexdigest(),
                size=hasher.size,
                chunk_sha256=hasher.finish(),
                chunk_size=self.chunk_size,
            )
            yield staged
        finally:
            tmp.unlink(missing_ok=True)

    def commit(self, staged: StagedArtifact, fmt: str) -> artifact_pb2.ArtifactManifest:
        """Move a staged upload to its digest and cache its manifest (idempotent)."""
        manifest = artifact_pb2.ArtifactManifest(
            digest=staged.digest,
            size=staged.size,
            chunk_size=staged.chunk_size,
            chunk_sha256=staged.chunk_sha256,
            format=fmt,
        )
        atomic_write(self._manifest_path(staged.digest), encode(manifest), mode=0o644)
        final = self.root / staged.digest
        os.chmod(staged.path, 0o644)
        os.replace(staged.path, final)
        fsync_dir(self.root)
        with self._lock:
            self._manifests[staged.digest] = manifest
        log.info(
            "artifact stored digest=%s size=%d chunks=%d",
            staged.digest,
            staged.size,
            len(staged.chunk_sha256),
        )
        return manifest

    def manifest(self, digest: str, fmt: str = "onnx") -> artifact_pb2.ArtifactManifest:
        with self._lock:
            cached = self._manifests.get(digest)
        if cached is not None and cached.chunk_size == self.chunk_size:
            return cached
        path = self.path(digest)
        if not path.is_file():
            raise ArtifactNotFound(f"unknown artifact {digest}")
        manifest = self._read_cached_manifest(digest)
        if manifest is None:
            manifest = self._compute_manifest(digest, path, fmt)
            atomic_write(self._manifest_path(digest), encode(manifest), mode=0o644)
        with self._lock:
            self._manifests[digest] = manifest
        return manifest

    def _read_cached_manifest(self, digest: str) -> artifact_pb2.ArtifactManifest | None:
        try:
            manifest = decode_as(artifact_pb2.ArtifactManifest, self._manifest_path(digest).read_bytes())
        except (OSError, PayloadError):
            return None
        if manifest.digest != digest or manifest.chunk_size != self.chunk_size:
            return None
        return manifest

    def _compute_manifest(self, digest: str, path: Path, fmt: str) -> artifact_pb2.ArtifactManifest:
        hasher = _ChunkHasher(self.chunk_size)
        with path.open("rb") as f:
            while data := f.read(_READ_SIZE):
                hasher.update(data)
        if hasher.whole.hexdigest() != digest:
            raise ArtifactNotFound(f"artifact {digest} is corrupt on disk")
        return artifact_pb2.ArtifactManifest(
            digest=digest,
            size=hasher.size,
            chunk_size=self.chunk_size,
            chunk_sha256=hasher.finish(),
            format=fmt,
        )

    def wave_key(self, digest: str) -> bytes:
        """The artifact's broadcast key (32 random bytes), made the first time it is asked for."""
        with self._lock:
            cached = self._wave_keys.get(digest)
        if cached is not None:
            return cached
        if not self.exists(digest):
            raise ArtifactNotFound(f"unknown artifact {digest}")
        path = self.root / f"{digest}.wavekey"
        key = self._read_key(path)
        if key is None:
            fd, tmp_name = tempfile.mkstemp(prefix=".wavekey-", suffix=".tmp", dir=self.root)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(os.urandom(KEY_BYTES))
                    out.flush()
                    os.fsync(out.fileno())
                # A link, not a rename: a key another controller made first is never replaced.
                with suppress(FileExistsError):
                    os.link(tmp_name, path)
                fsync_dir(self.root)
            finally:
                os.unlink(tmp_name)
            key = self._read_key(path)
            if key is None:
                raise ArtifactNotFound(f"the broadcast key of artifact {digest} is unreadable: {path}")
        with self._lock:
            self._wave_keys[digest] = key
        return key

    @staticmethod
    def _read_key(path: Path) -> bytes | None:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            return None
        return key if len(key) == KEY_BYTES else None

    def read_chunk(self, digest: str, index: int) -> artifact_pb2.Chunk:
        """Read chunk ``index`` only, from its offset."""
        manifest = self.manifest(digest)
        count = chunk_count(manifest.size, manifest.chunk_size)
        if not 0 <= index < count:
            raise ArtifactNotFound(f"artifact {digest} has no chunk {index} (it has {count})")
        offset = index * manifest.chunk_size
        length = min(manifest.chunk_size, manifest.size - offset)
        data = self._open.pread(os.path.join(self.root, digest), length, offset)
        if len(data) != length:
            raise ArtifactNotFound(f"artifact {digest} is truncated on disk")
        return artifact_pb2.Chunk(digest=digest, index=index, offset=offset, data=data)
