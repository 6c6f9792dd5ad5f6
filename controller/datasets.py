"""Captured data sets: reassembled from the devices' chunks, stored by sha256
with a manifest (device, model version, time range, capture policy), listed,
downloaded and labelled.

A data set is an ``.npz`` file (numpy, ``allow_pickle=False``) holding
``inputs`` (N, ...) and optionally ``probabilities`` (N, classes), ``at_ms`` (N,)
and ``reason_codes`` (N,: 0 random, 1 low confidence, 2 drifted). Chunks wait
in ``DIR/datasets/staging/{device}/{upload_id}/`` until all have arrived; the
whole must match the sha256 every chunk announced, else it is dropped. Labels
(one class per sample) are kept beside the manifest; their own sha256 goes into
the lineage of a model trained on them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import tenant_or_default

from controller.errors import DatasetNotFound, InvalidDataset
from controller.files import atomic_write
from controller.store import Store

log = logging.getLogger(__name__)

MAX_DATASET_BYTES = 64 * 1024 * 1024
MAX_CHUNKS = 4096
STAGING_TTL_S = 24 * 3600.0
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
REASONS = ("random", "low_confidence", "drifted")


@dataclass(frozen=True)
class Manifest:
    device_id: str
    tenant: str
    model_name: str
    model_version: str
    policy_id: str
    start_ms: int
    end_ms: int
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    digest: str
    size: int
    samples: int
    manifest: Manifest
    labelled: bool
    labels_digest: str
    created_at: float


@dataclass(frozen=True)
class Contents:
    inputs: np.ndarray[Any, Any]
    probabilities: np.ndarray[Any, Any] | None


def read_npz(data: bytes) -> Contents:
    """Parse and check a data set file; InvalidDataset names what is wrong."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataset(f"not a numpy .npz file: {exc}") from None
    inputs = arrays.get("inputs")
    if inputs is None or inputs.ndim < 1 or inputs.shape[0] == 0:
        raise InvalidDataset("the data set has no 'inputs' array with at least one sample")
    if inputs.dtype.kind not in "fiub":
        raise InvalidDataset(f"'inputs' must be numeric, not {inputs.dtype}")
    probs = arrays.get("probabilities")
    if probs is not None and (probs.ndim != 2 or probs.shape[0] != inputs.shape[0]):
        raise InvalidDataset(
            f"'probabilities' of shape {probs.shape} does not match {inputs.shape[0]} samples"
        )
    return Contents(inputs, probs)


def labels_digest(labels: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()


def accuracy(probabilities: np.ndarray[Any, Any], labels: Sequence[int]) -> float:
    predicted = np.asarray(probabilities).argmax(axis=1)
    return float(np.mean(predicted == np.asarray(labels)))


class Datasets:
    def __init__(self, store: Store, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.root = root
        self.staging = root / "staging"
        self.clock = clock

    def path(self, digest: str) -> Path:
        if not _SHA256.match(digest):
            raise DatasetNotFound(f"no data set {digest!r}")
        return self.root / f"{digest}.npz"

    # -- from devices ----------------------------------------------------------

    def receive(self, device_id: str, chunk: fleet_pb2.CaptureChunk, received_at: float) -> Dataset | None:
        """Keep one chunk; when it completes an upload, store the data set and return it."""
        try:
            return self._receive(device_id, chunk)
        except InvalidDataset as exc:
            log.warning(
                "capture chunk rejected device=%s upload=%s index=%d reason=%s",
                device_id,
                chunk.upload_id,
                chunk.index,
                exc,
            )
            return None

    def _receive(self, device_id: str, chunk: fleet_pb2.CaptureChunk) -> Dataset | None:
        if not _UPLOAD_ID.match(chunk.upload_id):
            raise InvalidDataset("upload_id must be 1-64 letters, digits, '_' or '-'")
        if not 1 <= chunk.count <= MAX_CHUNKS or chunk.index >= chunk.count:
            raise InvalidDataset(
                f"chunk {chunk.index} of {chunk.count} is out of range (at most {MAX_CHUNKS})"
            )
        if not _SHA256.match(chunk.sha256) or not 0 < chunk.size <= MAX_DATASET_BYTES:
            raise InvalidDataset(f"sha256 must be 64 hex digits and size 1..{MAX_DATASET_BYTES} bytes")
        if self._exists(chunk.sha256):
            return None
        folder = self.staging / device_id / chunk.upload_id
        header = {
            "sha256": chunk.sha256,
            "size": chunk.size,
            "count": chunk.count,
            "manifest": {
                "device_id": device_id,
                "tenant": tenant_or_default(chunk.tenant),
                "model_name": chunk.model_name,
                "model_version": chunk.model_version,
                "policy_id": chunk.policy_id,
                "start_ms": chunk.start_ms,
                "end_ms": chunk.end_ms,
                "reasons": dict(sorted(chunk.reasons.items())),
            },
        }
        header_file = folder / "header.json"
        if header_file.exists():
            known = json.loads(header_file.read_text())
            if (known["sha256"], known["size"], known["count"]) != (chunk.sha256, chunk.size, chunk.count):
                raise InvalidDataset("chunk announces another sha256, size or count than the upload's first")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(header_file, json.dumps(header).encode())
        atomic_write(folder / f"{chunk.index:06d}.part", chunk.data)
        parts = sorted(folder.glob("*.part"))
        if len(parts) < chunk.count:
            return None
        data = b"".join(p.read_bytes() for p in parts)
        shutil.rmtree(folder, ignore_errors=True)
        if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise InvalidDataset("the reassembled upload does not match its size and sha256; dropped")
        m = header["manifest"]
        assert isinstance(m, dict)
        return self.add(data, Manifest(**m))

    def expire_uploads(self, now: float) -> int:
        """Drop uploads whose chunks stopped coming a day ago."""
        removed = 0
        for folder in self.staging.glob("*/*"):
            try:
                if now - folder.stat().st_mtime > STAGING_TTL_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        return removed

    # -- stored data sets --------------------------------------------------------

    def _exists(self, digest: str) -> bool:
        return self.store.query_one("SELECT 1 AS x FROM datasets WHERE digest = ?", (digest,)) is not None

    def add(self, data: bytes, manifest: Manifest) -> Dataset:
        """Store a data set (idempotent: the same bytes are the same data set)."""
        if len(data) > MAX_DATASET_BYTES:
            raise InvalidDataset(f"a data set of {len(data)} bytes exceeds {MAX_DATASET_BYTES}")
        contents = read_npz(data)
        digest = hashlib.sha256(data).hexdigest()
        if self._exists(digest):
            return self.get(digest)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(digest), data)
        self.store.execute(
            "INSERT INTO datasets (digest, size, device_id, tenant, model_name, model_version,"
            " policy_id, start_ms, end_ms, samples, reasons, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                digest,
                len(data),
                manifest.device_id,
                manifest.tenant,
                manifest.model_name,
                manifest.model_version,
                manifest.policy_id,
                manifest.start_ms,
                manifest.end_ms,
                int(contents.inputs.shape[0]),
                json.dumps(manifest.reasons),
                self.clock(),
            ),
        )
        log.info(
            "data set stored digest=%s device=%s model=%s version=%s samples=%d policy=%s",
            digest,
            manifest.device_id,
            manifest.model_name,
            manifest.model_version,
            contents.inputs.shape[0],
            manifest.policy_id,
        )
        return self.get(digest)

    @staticmethod
    def _from_row(r: dict[str, Any]) -> Dataset:
        return Dataset(
            digest=r["digest"],
            size=r["size"],
            samples=r["samples"],
            manifest=Manifest(
                device_id=r["device_id"],
                tenant=r["tenant"],
                model_name=r["model_name"],
                model_version=r["model_version"],
                policy_id=r["policy_id"],
                start_ms=r["start_ms"],
                end_ms=r["end_ms"],
                reasons=json.loads(r["reasons"]),
            ),
            labelled=r["labels"] is not None,
            labels_digest=r["labels_digest"],
            created_at=r["created_at"],
        )

    def get(self, digest: str) -> Dataset:
        row = self.store.query_one("SELECT * FROM datasets WHERE digest = ?", (digest,))
        if row is None:
            raise DatasetNotFound(f"no data set {digest!r}")
        return self._from_row(row)

    def find(
        self, model_name: str | None = None, model_version: str | None = None, since: float = 0.0
    ) -> list[Dataset]:
        sql = "SELECT * FROM datasets WHERE created_at >= ?"
        params: list[Any] = [since]
        if model_name is not None:
            sql += " AND model_name = ?"
            params.append(model_name)
        if model_version is not None:
            sql += " AND model_version = ?"
            params.append(model_version)
        return [self._from_row(r) for r in self.store.query(sql + " ORDER BY created_at, digest", params)]

    def read(self, digest: str) -> bytes:
        self.get(digest)
        try:
            return self.path(digest).read_bytes()
        except OSError as exc:
            raise DatasetNotFound(f"data set {digest} is missing on disk: {exc}") from None

    def set_labels(self, digest: str, labels: Sequence[int]) -> Dataset:
        dataset = self.get(digest)
        if len(labels) != dataset.samples:
            raise InvalidDataset(f"{len(labels)} labels for a data set of {dataset.samples} samples")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in labels):
            raise InvalidDataset("labels must be class indices (integers >= 0)")
        self.store.execute(
            "UPDATE datasets SET labels = ?, labels_digest = ? WHERE digest = ?",
            (json.dumps(list(labels)), labels_digest(labels), digest),
        )
        log.info("data set labelled digest=%s samples=%d", digest, len(labels))
        return self.get(digest)

    def labels(self, digest: str) -> list[int] | None:
        self.get(digest)
        row = self.store.query_one("SELECT labels FROM datasets WHERE digest = ?", (digest,))
        return None if row is None or row["labels"] is None else list(json.loads(row["labels"]))

    def feedback_accuracy(self, model_name: str, model_version: str) -> tuple[float, int] | None:
        """Accuracy of the version's own predictions on its labelled captured samples, and how many."""
        correct, total = 0.0, 0
        for ds in self.find(model_name, model_version):
            labels = self.labels(ds.digest) if ds.labelled else None
            if labels is None:
                continue
            contents = read_npz(self.read(ds.digest))
            if contents.probabilities is None:
                continue
            correct += accuracy(contents.probabilities, labels) * len(labels)
            total += len(labels)
        return (correct / total, total) if total else None
