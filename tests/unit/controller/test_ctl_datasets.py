"""Captured data sets: refused chunks change nothing, labels, feedback accuracy, staging expiry."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from controller.datasets import Datasets, Manifest
from controller.errors import DatasetNotFound, InvalidDataset
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


MANIFEST = Manifest("cam-1", "default", "digits", "1", "p", 0, 1)


@pytest.fixture
def datasets(tmp_path: Path, store_url: str) -> Datasets:
    return Datasets(Parts(tmp_path, database_url=store_url).store, tmp_path / "datasets", clock=lambda: 5.0)


def chunk(data: bytes, **fields: object) -> fleet_pb2.CaptureChunk:
    base: dict[str, object] = {
        "upload_id": "u1",
        "model_name": "digits",
        "model_version": "1",
        "index": 0,
        "count": 1,
        "data": data,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    return fleet_pb2.CaptureChunk(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"upload_id": "../etc"},
        {"index": 1},
        {"count": 0},
        {"sha256": "xyz"},
        {"size": 0},
        {"sha256": "0" * 64},  # whole does not match
    ],
)
def test_bad_chunks_store_nothing(datasets: Datasets, fields: dict[str, object]) -> None:
    data = npz(inputs=np.ones((2, 3)))
    assert datasets.receive("cam-1", chunk(data, **fields), 0.0) is None
    assert datasets.find() == []
    assert not list(datasets.staging.glob("*/*/*.part"))


def test_not_an_npz_or_without_inputs_is_refused(datasets: Datasets) -> None:
    for data, message in (
        (b"junk", "npz"),
        (npz(x=np.ones(3)), "inputs"),
        (npz(inputs=np.array(["a"])), "numeric"),
    ):
        with pytest.raises(InvalidDataset, match=message):
            datasets.add(data, MANIFEST)
    with pytest.raises(InvalidDataset, match="does not match"):
        datasets.add(npz(inputs=np.ones((2, 3)), probabilities=np.ones((3, 2))), MANIFEST)


def test_a_chunk_contradicting_its_upload_is_refused(datasets: Datasets) -> None:
    data = npz(inputs=np.ones((4, 8)))
    half = len(data) // 2
    whole = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    first = chunk(data[:half], count=2, **whole)
    assert datasets.receive("cam-1", first, 0.0) is None
    liar = chunk(data[half:], index=1, count=2, sha256="1" * 64)
    assert datasets.receive("cam-1", liar, 0.0) is None and datasets.find() == []
    stored = datasets.receive("cam-1", chunk(data[half:], index=1, count=2, **whole), 0.0)
    assert stored is not None and stored.digest == first.sha256


def test_same_bytes_are_the_same_data_set(datasets: Datasets) -> None:
    data = npz(inputs=np.ones((2, 3)))
    a, b = datasets.add(data, MANIFEST), datasets.add(data, MANIFEST)
    assert a == b and len(datasets.find()) == 1
    assert datasets.path(a.digest).read_bytes() == data
    with pytest.raises(DatasetNotFound):
        datasets.get("0" * 64)
    with pytest.raises(DatasetNotFound):
        datasets.path("../../etc/passwd")


def test_labels_and_feedback_accuracy(datasets: Datasets) -> None:
    probs = np.eye(4)[[0, 1, 2, 3]]
    ds = datasets.add(npz(inputs=np.ones((4, 2)), probabilities=probs), MANIFEST)
    assert datasets.feedback_accuracy("digits", "1") is None
    for bad in ([0, 1], [0, 1, 2, -1], [0, 1, 2, True]):
        with pytest.raises(InvalidDataset):
            datasets.set_labels(ds.digest, bad)  # type: ignore[arg-type]
    assert not datasets.get(ds.digest).labelled
    labelled = datasets.set_labels(ds.digest, [0, 1, 0, 0])
    assert labelled.labelled and labelled.labels_digest
    assert datasets.feedback_accuracy("digits", "1") == (0.5, 4)
    assert datasets.feedback_accuracy("digits", "2") is None


def test_stale_uploads_expire(datasets: Datasets) -> None:
    data = npz(inputs=np.ones((4, 8)))
    datasets.receive("cam-1", chunk(data[:10], count=2), 0.0)
    (folder,) = datasets.staging.glob("*/*")
    old = folder.stat().st_mtime - 2 * 86_400
    os.utime(folder, (old, old))
    assert datasets.expire_uploads(folder.stat().st_mtime + 2 * 86_400 - 10) == 1
    assert not folder.exists()
