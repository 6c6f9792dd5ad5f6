"""Registry: lineage, stages, comparison, TFLite uploads, calibration sets, signed variants."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto.signing import manifest_bytes

from controller.errors import ConflictError, InvalidInputError, InvalidModel
from controller.registry import STATIC_INT8, Lineage, Registry, UploadOptions
from controller.signing import verify
from tests.support.models import digits_mlp, sine_float_tflite, tflite_mlp
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

DATASET = "ab" * 32


@pytest.fixture
def registry(tmp_path: Path, store_url: str) -> Registry:
    return Parts(tmp_path, database_url=store_url).registry


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_mlp(tmp_path_factory.mktemp("m") / "mlp.onnx").path


def upload(registry: Registry, path: Path, version: str, **options: object) -> object:
    return registry.upload("mlp", version, path.open("rb"), {}, UploadOptions(**options))  # type: ignore[arg-type]


def test_lineage_is_recorded_and_checked(registry: Registry, mlp_path: Path) -> None:
    first = registry.upload(
        "mlp",
        "1",
        mlp_path.open("rb"),
        {},
        UploadOptions(lineage=Lineage("", DATASET, "train.py@3f2a", {"accuracy": 0.91}), task="classifier"),
    )
    assert first.lineage == Lineage("", DATASET, "train.py@3f2a", {"accuracy": 0.91})
    assert (first.stage, first.task, first.gate) == ("development", "classifier", 0.99)
    reference, lowered = first.variants  # the upload, then its copy at the IR version it needs
    assert (reference.variant, reference.source, reference.status, reference.opset) == (
        "onnx-fp32",
        "uploaded",
        "ready",
        17,
    )
    assert verify(
        registry.signer.public_key,
        bytes.fromhex(reference.signature),
        manifest_bytes("mlp", "1", "onnx-fp32", first.digest, first.size),
    )
    assert reference.key_id == registry.signer.key_id
    # The installed onnx writes IR 14, which onnxruntime reads from 1.32 on; opset 17 alone
    # needs IR 8, which the copy states: the first onnxruntime with opset 17 reads it.
    assert reference.runtime_version == "1.32"
    assert (lowered.variant, lowered.source, lowered.status, lowered.runtime_version) == (
        "onnx-fp32-ir8",
        "lowered",
        "ready",
        "1.12",
    )
    assert lowered.report["lowered_from"] == "onnx-fp32" and lowered.digest != reference.digest
    second = registry.upload(
        "mlp",
        "2",
        mlp_path.open("rb"),
        {},
        UploadOptions(lineage=Lineage("1", DATASET, "train.py@9c1d", {"accuracy": 0.95})),
    )
    assert second.lineage.parent_version == "1"
    for bad, message in (
        (
            UploadOptions(lineage=Lineage(parent_version="0.9")),
            "parent version 0.9 of model mlp does not exist",
        ),
        (UploadOptions(lineage=Lineage(dataset_digest="xyz")), "is not a sha256"),
        (UploadOptions(gate=1.5), r"gate must be in \(0, 1\]"),
        (UploadOptions(task="ranking"), "task must be one of"),
        (UploadOptions(sensor_kind="lidar"), "sensor must be one of"),
        (UploadOptions(dynamic=True), "needs a calibration set"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            registry.upload("mlp", "3", mlp_path.open("rb"), {}, bad)
    assert [v.version for v in registry.all()[0].versions] == ["1", "2"]


def test_stages_follow_the_transition_table(registry: Registry, mlp_path: Path) -> None:
    upload(registry, mlp_path, "1")
    upload(registry, mlp_path, "2")
    assert registry.set_stage("mlp", "1", "production").stage == "production"
    assert registry.set_stage("mlp", "2", "staging").stage == "staging"
    # Promoting another version to production archives the previous one.
    registry.set_stage("mlp", "2", "production")
    assert [(v.version, v.stage) for v in registry.all()[0].versions] == [
        ("1", "archived"),
        ("2", "production"),
    ]
    with pytest.raises(InvalidInputError, match="cannot go from archived to production"):
        registry.set_stage("mlp", "1", "production")
    with pytest.raises(InvalidInputError, match="stage must be one of"):
        registry.set_stage("mlp", "1", "retired")
    assert registry.set_stage("mlp", "1", "development").stage == "development"


def test_compare_two_versions(registry: Registry, mlp_path: Path, tmp_path: Path) -> None:
    registry.upload(
        "mlp",
        "1",
        mlp_path.open("rb"),
        {},
        UploadOptions(lineage=Lineage(metrics={"accuracy": 0.9, "f1": 0.8})),
    )
    other = digits_mlp(tmp_path / "other.onnx", hidden=16).path
    registry.upload(
        "mlp",
        "2",
        other.open("rb"),
        {},
        UploadOptions(lineage=Lineage("1", DATASET, "v2", {"accuracy": 0.95})),
    )
    diff = registry.compare("mlp", "1", "2")
    assert diff["metrics"]["accuracy"] == {"1": 0.9, "2": 0.95, "delta": pytest.approx(0.05)}
    assert diff["metrics"]["f1"] == {"1": 0.8, "2": None}
    assert diff["lineage"]["parent_version"] == {"1": "", "2": "1"}
    assert diff["same_signature"] and not diff["same_artifact"] and diff["b_descends_from_a"]
    assert diff["variants"]["onnx-fp32"]["1"]["size"] > diff["variants"]["onnx-fp32"]["2"]["size"]


def test_tflite_uploads_are_inspected_with_litert(registry: Registry, mlp_path: Path, tmp_path: Path) -> None:
    sine = registry.upload("sine", "1", sine_float_tflite().open("rb"), {}, UploadOptions(task="regression"))
    assert (sine.format, sine.variants[0].variant, sine.variants[0].runtime) == (
        "tflite",
        "tflite-fp32",
        "litert",
    )
    assert sine.inputs[0].shape == [-1, 1] and sine.inputs[0].dtype == "float32"
    mlp = digits_mlp(tmp_path / "m.onnx")
    upload(registry, mlp.path, "1")
    added = registry.add_variant("mlp", "1", tflite_mlp(tmp_path / "f.tflite", mlp.layers).open("rb"))
    assert (added.variant, added.precision, added.status) == (
        "tflite-fp32",
        "fp32",
        "ready",
    )  # nothing to validate on
    assert added.report == {"validated": False, "why": "the version has no calibration set"}
    quantized = registry.add_variant(
        "mlp",
        "1",
        tflite_mlp(tmp_path / "q.tflite", mlp.layers, int8=True, calibration=mlp.calibration).open("rb"),
    )
    assert quantized.precision == "int8" and quantized.inputs[0].dtype == "int8"
    assert quantized.report["quantization"]["input"]["zero_points"] == [-128.0]
    with pytest.raises(ConflictError, match="already has a tflite-int8 variant"):
        registry.add_variant("mlp", "1", (tmp_path / "q.tflite").open("rb"))
    with pytest.raises(InvalidModel, match="input 0 takes 64 values per sample, version 1 takes 1"):
        registry.add_variant("sine", "1", mlp.path.open("rb"))
    broken = (tmp_path / "q.tflite").read_bytes()[:300]
    with pytest.raises(InvalidModel, match="LiteRT cannot load the model"):
        registry.upload("bad", "1", io.BytesIO(broken), {})


def npz(**arrays: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return buf


def test_calibration_sets_must_fit_the_inputs(registry: Registry, mlp_path: Path) -> None:
    x = np.zeros((8, 64), dtype=np.float32)
    for data, message in (
        (io.BytesIO(b"not a zip"), "not a readable .npz"),
        (npz(image=x), r"array 'image' is not an input of the model \(its inputs: \['X'\]\)"),
        (npz(X=x.astype(np.float64)), "is float64, the input wants float32"),
        (npz(X=np.zeros((8, 65), dtype=np.float32)), r"has shape \[8, 65\], the input is \[-1, 64\]"),
        (npz(X=np.zeros((0, 64), dtype=np.float32)), "non-zero number of samples"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            registry.upload("mlp", "1", mlp_path.open("rb"), {}, UploadOptions(), data)
    assert registry.all() == [] and list(registry.calibration_dir.iterdir()) == []
    created = registry.upload("mlp", "1", mlp_path.open("rb"), {}, UploadOptions(), npz(X=x))
    assert registry.calibration_path(created.calibration_digest).is_file()
    pending = created.variant(STATIC_INT8)
    assert pending is not None and (pending.status, pending.progress, pending.digest) == ("pending", 0.0, "")
