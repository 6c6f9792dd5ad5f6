"""Quantized variants: validation (pure) and production on real models with onnxruntime."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgefleet_proto.signing import manifest_bytes

from controller.optimize import Optimizer, validate
from controller.registry import DYNAMIC_INT8, FP16, STATIC_INT8, Registry, UploadOptions
from controller.signing import verify
from tests.support.models import digits_classifier, digits_mlp, sklearn_mlp, small_conv, tflite_mlp
from tests.unit.controller.helpers import Parts


def npz(**arrays: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return buf


def test_classifier_gate_on_top1_agreement() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    ok = validate([ref], [ref + 0.01], "classifier", 0.99)
    assert (
        ok.passed
        and ok.report["top1_agreement"] == 1.0
        and ok.report["max_abs_deviation"] == pytest.approx(0.01)
    )
    flipped = ref.copy()
    flipped[2] = [0.4, 0.6]
    bad = validate([ref], [flipped], "classifier", 0.99)
    assert not bad.passed and bad.report["top1_agreement"] == 0.75
    assert bad.reason == "top-1 agreement 75.00% is below the gate 99.00%"
    labels = np.array([1, 2, 3, 4])
    assert validate([labels], [np.array([1, 2, 3, 5])], "classifier", 0.7).report["top1_agreement"] == 0.75


def test_classifier_gate_reads_the_output_the_signature_calls_scores() -> None:
    features = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    # The features' top column flips, the classes do not: judged on the scores, it passes.
    moved = [features[:, ::-1], logits + 0.1]
    assert validate([features, logits], moved, "classifier", 0.99, scores=1).report["top1_agreement"] == 1.0
    assert validate([features, logits], moved, "classifier", 0.99, scores=0).report["top1_agreement"] == 0.0


def test_regression_gate_on_relative_deviation() -> None:
    ref = np.full((4, 3), 2.0, dtype=np.float32)
    close = validate([ref], [ref + 0.01], "regression", 0.99)
    assert close.passed and close.report["relative_agreement"] == pytest.approx(0.995)
    far = validate([ref], [ref + 0.1], "regression", 0.99)
    assert (
        not far.passed
        and "below the gate" in far.reason
        and far.report["max_abs_deviation"] == pytest.approx(0.1)
    )


def test_outputs_that_do_not_line_up_fail() -> None:
    ref = np.zeros((4, 3), dtype=np.float32)
    assert (
        validate([ref], [ref, ref], "regression", 0.9).reason == "the variant has 2 outputs, the reference 1"
    )
    assert "has shape [4, 2]" in validate([ref], [ref[:, :2]], "regression", 0.9).reason


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(tmp_path)


def test_int8_and_fp16_variants_of_a_skl2onnx_classifier_pass_the_gate(parts: Parts, tmp_path: Path) -> None:
    digits = sklearn_mlp(tmp_path / "mlp.onnx")
    registry: Registry = parts.registry
    created = registry.upload(
        "digits",
        "1",
        digits.path.open("rb"),
        {},
        UploadOptions(dynamic=True, fp16=True),
        npz(X=digits.samples[:200]),
    )
    assert {v.variant: v.status for v in created.variants} == {
        "onnx-fp32": "ready",
        STATIC_INT8: "pending",
        DYNAMIC_INT8: "pending",
        FP16: "pending",
    }
    Optimizer(registry, tmp_path / "work").process("digits", "1")
    done = registry.get("digits", "1")
    fp32 = done.variant("onnx-fp32")
    assert fp32 is not None and fp32.latency_ms is not None and fp32.latency_ms > 0
    for name, precision in ((STATIC_INT8, "int8"), (DYNAMIC_INT8, "int8"), (FP16, "fp16")):
        v = done.variant(name)
        assert v is not None
        assert (v.status, v.precision, v.format, v.progress, v.reason) == (
            "ready",
            precision,
            "onnx",
            1.0,
            "",
        )
        assert v.report["top1_agreement"] >= 0.99 and v.report["samples"] == 200
        assert v.size < fp32.size and v.latency_ms is not None
        assert v.inputs == fp32.inputs and v.opset >= 13
        assert registry.artifacts.path(v.digest).stat().st_size == v.size
        signed = manifest_bytes("digits", "1", name, v.digest, v.size)
        assert verify(registry.signer.public_key, bytes.fromhex(v.signature), signed)
    assert list((tmp_path / "work").iterdir()) == []


def test_a_conv_net_below_the_gate_is_rejected_with_the_reason(parts: Parts, tmp_path: Path) -> None:
    conv = small_conv(tmp_path / "conv.onnx")
    images = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    options = UploadOptions(gate=0.999, task="classifier")
    parts.registry.upload("conv", "1", conv.open("rb"), {}, options, npz(image=images))
    Optimizer(parts.registry, tmp_path / "work").process("conv", "1")
    v = parts.registry.get("conv", "1").variant(STATIC_INT8)
    assert v is not None and v.status == "rejected"
    assert v.reason.startswith("top-1 agreement") and v.reason.endswith("is below the gate 99.90%")
    assert v.report["top1_agreement"] < 0.999 and "per_channel" in v.report


def test_a_model_quantization_cannot_handle_is_rejected_with_its_reason(parts: Parts, tmp_path: Path) -> None:
    # ai.onnx.ml operators only, and skl2onnx lists the default domain twice in opset_import,
    # which onnxruntime.quantization refuses ("Failed to find proper ai.onnx domain").
    digits = digits_classifier(tmp_path / "logreg.onnx")
    assert [o.domain for o in onnx.load(str(digits.path)).opset_import].count("") == 2
    parts.registry.upload("lr", "1", digits.path.open("rb"), {}, UploadOptions(), npz(X=digits.samples[:20]))
    Optimizer(parts.registry, tmp_path / "work").process("lr", "1")
    v = parts.registry.get("lr", "1").variant(STATIC_INT8)
    assert v is not None and v.status == "rejected", v
    assert (
        v.reason.startswith("no operator of this model could be converted to int8 (")
        and "LinearClassifier" in v.reason
    )
    assert v.report["preparation"]["opsets_normalised"] is True


def test_an_uploaded_tflite_variant_is_validated_against_the_reference(parts: Parts, tmp_path: Path) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    registry = parts.registry
    registry.upload("mlp", "1", mlp.path.open("rb"), {}, UploadOptions(), npz(X=mlp.samples[:100]))
    tfl = tflite_mlp(tmp_path / "mlp.tflite", mlp.layers, int8=True, calibration=mlp.calibration)
    added = registry.add_variant("mlp", "1", tfl.open("rb"))
    assert (added.variant, added.format, added.precision, added.status) == (
        "tflite-int8",
        "tflite",
        "int8",
        "pending",
    )
    assert added.inputs[0].dtype == "int8" and added.report["quantization"]["input"]["scales"]
    Optimizer(registry, tmp_path / "work").process("mlp", "1")
    v = registry.get("mlp", "1").variant("tflite-int8")
    assert v is not None and v.status == "ready" and v.report["top1_agreement"] >= 0.99, v


def test_the_worker_thread_resumes_what_a_restart_left_pending(parts: Parts, tmp_path: Path) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    parts.registry.upload("mlp", "1", mlp.path.open("rb"), {}, UploadOptions(), npz(X=mlp.samples[:50]))
    assert parts.registry.unfinished() == [("mlp", "1")]
    worker = Optimizer(parts.registry, tmp_path / "work")
    worker.start()  # a fresh process: finds the pending variant on its own
    try:
        assert worker.wait_idle(120)
    finally:
        worker.stop()
    assert parts.registry.unfinished() == []
    v = parts.registry.get("mlp", "1").variant(STATIC_INT8)
    assert v is not None and v.status == "ready"


def test_a_variant_whose_production_keeps_stopping_the_controller_is_given_up(
    parts: Parts, tmp_path: Path
) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    registry = parts.registry
    registry.upload("mlp", "1", mlp.path.open("rb"), {}, UploadOptions(dynamic=True), npz(X=mlp.samples[:50]))
    # What three controller runs killed while producing the static variant leave behind.
    registry.set_variant_state("mlp", "1", STATIC_INT8, "running", 0.1, "", {"attempts": 3})
    registry.set_variant_state("mlp", "1", DYNAMIC_INT8, "running", 0.1, "", {"attempts": 1})
    Optimizer(registry, tmp_path / "work").process("mlp", "1")
    found = registry.get("mlp", "1")
    static, dynamic = found.variant(STATIC_INT8), found.variant(DYNAMIC_INT8)
    assert static is not None and static.status == "failed"
    assert static.reason == (
        "variant production was interrupted 3 times (the controller stopped while producing it); not tried again"
    )
    assert dynamic is not None and dynamic.status == "ready" and dynamic.report["attempts"] == 2
    assert registry.unfinished() == []
