"""What an operator sees of real models' variants through `edgefleet models ...`, against the
real controller process: refusals that say why, and every variant ending with its reason."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.localfleet import Controller
from tests.support.realmodels import sample_inputs

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

    # A calibration set the model cannot run on is refused at once, with the runtime's reason,
    # instead of every variant failing later; nothing is stored.
    samples = sample_inputs("silero_vad", 4)
    short = {**samples, "input": samples["input"][:, :1]}  # too short for the model's STFT padding
    calibration = tmp_path / "short.npz"
    np.savez(calibration, **short)
    refused = controller.cli(
        "models", "upload", str(real_models("silero_vad")), "--name", "vad", "--version", "1",
        "--calibration", str(calibration), "--dynamic", check=False,
    )  # fmt: skip
    assert isinstance(refused, subprocess.CompletedProcess) and refused.returncode == 1
    assert "422" in refused.stderr and "Pad reflect" in refused.stderr, refused.stderr
    missing = controller.cli("models", "show", "vad", "1", check=False)
    assert isinstance(missing, subprocess.CompletedProcess) and missing.returncode == 1

    # With samples it runs on, every variant ends (never pending), each refusal with its reason.
    calibration = tmp_path / "vad.npz"
    np.savez(calibration, **samples)
    controller.cli(
        "models", "upload", str(real_models("silero_vad")), "--name", "vad", "--version", "1",
        "--calibration", str(calibration), "--dynamic",
    )  # fmt: skip
    shown = shown_when_final(controller, "vad")
    quantized = {v["variant"]: v for v in shown["variants"] if v["source"] == "quantized"}
    assert set(quantized) == {"onnx-int8-static", "onnx-int8-dynamic"}
    for variant in quantized.values():
        if variant["status"] != "ready":
            assert variant["reason"], variant
