"""What thousands of simulated devices in one process share: artifact bytes and loaded models.

A real device keeps every artifact it downloads on its own disk and loads it in
its own runtime. Ten thousand simulated devices cannot (5 MB each is 50 GB), so
a simulator process keeps one copy of each verified chunk and artifact and one
loaded model per artifact. What each device checks is unchanged: every chunk
goes through the agent's own :func:`agent.artifacts.check_chunk` before it
counts, and the manifest through :func:`agent.artifacts.validate_manifest`.
The whole-artifact sha256 (:func:`agent.artifacts.check_whole`) is computed once
per process: a device's chunks each matched the manifest's hashes, so the file
they assemble is byte for byte the one already checked, and hashing it again
would only spend the CPU that the controller and the broker are measured on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgefleet_proto import artifact_pb2

from agent.artifacts import (
    SAMPLE_FORMAT,
    ArtifactStore,
    Download,
    check_chunk,
    check_whole,
    validate_manifest,
)
from agent.atomic import write_atomic
from agent.pool import ModelPool
from agent.runtime import LoadedModel, backend_for


class SharedContent:
    """One copy per process of every verified chunk (by its sha256) and every verified artifact."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.chunks: dict[bytes, bytes] = {}
        self.verified: dict[str, Path] = {}
        self.models: dict[str, LoadedModel] = {}

    def path(self, digest: str, fmt: str) -> Path:
        return self.directory / f"{digest}.{fmt}"

    def assemble(self, download: Download, target: Path) -> Path:
        """The artifact the download's chunks make, checked whole the first time and kept."""
        known = self.verified.get(download.digest)
        if known is not None:
            return known
        data = b"".join(self.chunks[h] for h in download.manifest.chunk_sha256)
        check_whole(download, hashlib.sha256(data).hexdigest())
        write_atomic(target, data)
        self.verified[download.digest] = target
        return target

    def load(self, digest: str, path: Path, runtime: str, fmt: str) -> LoadedModel:
        model = self.models.get(digest)
        if model is None:
            model = self.models[digest] = backend_for(runtime, fmt, 1).load(path)
        return model


class SimArtifacts(ArtifactStore):
    """One device's artifact store, its bytes in the process's :class:`SharedContent`."""

    def __init__(self, content: SharedContent) -> None:
        # No folders of its own: nothing of a device's artifacts is written per device.
        self.reserve_bytes = 0
        self.content = content
        self._installed: set[str] = set()
        self.bytes_received = 0

    def model_path(self, digest: str, fmt: str) -> Path:
        return self.content.path(digest, fmt)

    def sample_path(self, digest: str) -> Path:
        return self.content.path(digest, SAMPLE_FORMAT)

    def installed(self) -> dict[str, Path]:
        return {d: self.content.verified[d] for d in self._installed}

    def pending(self) -> list[str]:
        return []

    def open(self, digest: str) -> Download | None:
        return None

    def start(self, digest: str, manifest: artifact_pb2.ArtifactManifest, expected_size: int = 0) -> Download:
        validate_manifest(digest, manifest, expected_size)
        return Download(digest, manifest, self.content.directory / "downloads" / digest)

    def write_chunk(self, download: Download, index: int, offset: int, data: bytes) -> None:
        check_chunk(download, index, offset, data)
        known = download.manifest.chunk_sha256[index]
        if known not in self.content.chunks:
            self.content.chunks[known] = bytes(data)
        self.bytes_received += len(data)
        download.have.add(index)

    def finalize(self, download: Download, sample: bool = False) -> Path:
        fmt = SAMPLE_FORMAT if sample else download.manifest.format
        path = self.content.assemble(download, self.content.path(download.digest, fmt))
        self._installed.add(download.digest)
        return path

    def discard(self, digest: str) -> None:
        pass

    def remove_model(self, digest: str) -> None:
        self._installed.discard(digest)


class SharedModels(ModelPool):
    """A device's model pool whose loads share the process's one loaded copy per artifact."""

    def __init__(self, content: SharedContent) -> None:
        super().__init__()
        self.content = content

    def load(self, digest: str, path: Path, runtime: str, fmt: str = "onnx") -> LoadedModel:
        return self.content.load(digest, path, runtime, fmt)
