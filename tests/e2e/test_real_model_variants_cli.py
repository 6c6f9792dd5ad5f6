"""What an operator sees of real models' variants through `edgefleet models ...`, against the
real controller process: refusals that say why, and every variant ending with its reason."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.localfleet import Controller
from tests.realmodels import sample_inputs

FINAL = ("ready", "rejected", "failed")


def shown_when_final(controller: Controller, name: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        shown: dict[str, Any] = controller.cli("models", "show", name, "1")
        if all(v["status"] in FINAL for v in shown["variants"]):
            return shown
        assert time.monotonic() < deadline, f"variants of {name} still unfinished: {shown['variants']}"
        time.sleep(0.2)


def test_variant_failures_and_refused_options_reach_the_operator(
    controller: Controller, real_models: Callable[[str], Path], tmp_path: Path
) -> None:
    face = real_models("face_detection_short_range")
    refused = controller.cli(
        "models", "upload", str(face), "--name", "face", "--version", "1", "--fp16", check=False
    )
    assert isinstance(refused, subprocess.CompletedProcess) and refused.returncode == 1
    assert "422: an fp16 variant cannot be produced from a tflite file" in refused.stderr

    samples = sample_inputs("silero_vad", 4)
    samples["input"] = samples["input"][:, :1]  # too short for the model's STFT padding
    calibration = tmp_path / "vad.npz"
    np.savez(calibration, **samples)
    controller.cli(
        "models", "upload", str(real_models("silero_vad")), "--name", "vad", "--version", "1",
        "--calibration", str(calibration), "--dynamic",
    )  # fmt: skip
    shown = shown_when_final(controller, "vad")
    failed = {v["variant"]: v["reason"] for v in shown["variants"] if v["source"] == "quantized"}
    assert set(failed) == {"onnx-int8-static", "onnx-int8-dynamic"}
    for reason in failed.values():
        assert (
            reason.startswith("the uploaded model fails on the calibration set") and "Pad reflect" in reason
        )
    assert {v["status"] for v in shown["variants"] if v["source"] == "quantized"} == {"failed"}
