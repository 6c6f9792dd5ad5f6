"""The LiteRT backend on real TFLite models: the one tflite-micro ships and ones built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import InvalidInput, ModelLoadError
from agent.runtime import BACKENDS, LiteRtBackend, TensorSpec, backend_for
from tests.support.models import digits_mlp, sine_float_tflite, tflite_mlp


def test_litert_is_available_and_chosen_for_tflite() -> None:
    assert "litert" in BACKENDS
    assert isinstance(backend_for("", "tflite"), LiteRtBackend)


def test_the_sine_model_runs_any_batch_size() -> None:
    model = LiteRtBackend(threads=1).load(sine_float_tflite())
    assert model.inputs == [TensorSpec("serving_default_dense_input:0", "float32", (-1, 1))]
    x = np.linspace(0, 2 * np.pi, 7, dtype=np.float32).reshape(7, 1)
    [name] = [o.name for o in model.outputs]
    y = model.run({model.inputs[0].name: x})[name]
    assert y.shape == (7, 1)
    # A small trained network: close to sin(x), not exact.
    assert np.max(np.abs(y[:, 0] - np.sin(x[:, 0]))) < 0.2
    single = model.run({model.inputs[0].name: x[:1]})[name]
    np.testing.assert_allclose(single, y[:1], rtol=1e-5)


def test_float_and_int8_mlps_agree_with_the_onnx_reference(tmp_path: Path) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    reference = ort.InferenceSession(str(mlp.path)).run(None, {"X": mlp.samples})[0]
    floating = LiteRtBackend().load(tflite_mlp(tmp_path / "f.tflite", mlp.layers))
    out = floating.run({"input": mlp.samples})["fc1"]
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    quantized = LiteRtBackend().load(tflite_mlp(tmp_path / "q.tflite", mlp.layers, True, mlp.calibration))
    # Integer-only I/O is served with real values at the edge: float32 in, float32 out.
    assert quantized.inputs[0].dtype == "float32" and quantized.outputs[0].dtype == "float32"
    real = quantized.run({"input": mlp.samples})["fc1"]
    assert real.dtype == np.float32
    assert np.mean(real.argmax(axis=1) == reference.argmax(axis=1)) >= 0.98
    # Dequantized scores are on the reference's scale, not raw int8 codes.
    assert np.median(np.abs(real - reference)) < 0.1 * np.abs(reference).max()
    # A caller may still hand the raw integers (this calibration maps [0, 1] to [-128, 127]).
    q = np.clip(np.round(mlp.samples * 255 - 128), -128, 127).astype(np.int8)
    labels = quantized.run({"input": q})["fc1"].argmax(axis=1)
    assert np.mean(labels == reference.argmax(axis=1)) >= 0.98


def test_bad_inputs_and_files_are_refused(tmp_path: Path) -> None:
    model = LiteRtBackend().load(sine_float_tflite())
    name = model.inputs[0].name
    with pytest.raises(InvalidInput, match="is float64"):
        model.run({name: np.zeros((1, 1))})
    with pytest.raises(InvalidInput, match="missing"):
        model.run({})
    with pytest.raises(InvalidInput, match="unknown output"):
        model.run({name: np.zeros((1, 1), np.float32)}, ["nope"])
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(sine_float_tflite().read_bytes()[:200])
    with pytest.raises(ModelLoadError, match=r"LiteRT cannot load broken\.tflite"):
        LiteRtBackend().load(broken)
