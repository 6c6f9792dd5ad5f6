"""An int8 TFLite model with float32 inputs and outputs (QUANTIZE/DEQUANTIZE at its edges, int8
kernels inside: what the TFLite converter writes by default) through the REST API: labelled
int8 compute and storage with float I/O, chosen as int8 on CPU-only device classes, and
validated as a variant against the ONNX reference by feeding it the same float samples."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.controller_process import Ctl
from tests.support.models import digits_mlp, tflite_mlp
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"
CPU_ONLY = ("raspberry-pi-4-4gb", "raspberry-pi-zero-2-w", "siemens-simatic-ipc127e")


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def upload(ctl: Ctl, name: str, path: Path, **files: bytes) -> Any:
    parts: dict[str, Any] = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    parts |= {key: (f"{key}.npz", data, "application/octet-stream") for key, data in files.items()}
    return ctl.api(
        "POST", f"/v1/models/{name}/versions", data={"version": "1", "task": "classifier"}, files=parts
    )


def test_int8_tflite_with_float_io_is_int8_on_cpu_devices_and_validated_on_float_samples(
    ctl: Ctl, tmp_path: Path
) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    quantized = tflite_mlp(
        tmp_path / "mlp_int8.tflite", mlp.layers, int8=True, calibration=mlp.calibration, float_io=True
    )

    created = upload(ctl, "digits-q", quantized)
    assert created.status_code == 201, created.text
    (reference,) = created.json()["variants"]
    assert (reference["variant"], reference["precision"], reference["runtime"]) == (
        "tflite-int8",
        "int8",
        "litert",
    )
    assert reference["report"].get("storage", "int8") == "int8"
    assert [(t["dtype"], t["shape"]) for t in reference["inputs"]] == [("float32", [-1, 64])]
    assert [(t["dtype"], t["shape"]) for t in reference["outputs"]] == [("float32", [-1, 10])]
    # Nothing to (de)quantize at its edges: the interpreter takes and gives floats.
    assert "quantization" not in reference["report"]
    for profile in CPU_ONLY:
        ctl.api("POST", "/v1/profiles", json={"source": (PROFILES / f"{profile}.toml").read_text()})
        assert (
            ctl.api("POST", "/v1/devices", json={"device_id": f"d-{profile}", "profile": profile}).status_code
            == 201
        )
    rollout = ctl.api(
        "POST",
        "/v1/rollouts",
        json={"model": "digits-q", "version": "1", "devices": [f"d-{p}" for p in CPU_ONLY]},
    )
    assert rollout.status_code == 201, rollout.text
    targets = ctl.api("GET", f"/v1/rollouts/{rollout.json()['id']}/variants").json()
    assert {t["profile"]: (t["variant"], t["skipped"]) for t in targets} == {
        p: ("tflite-int8", "") for p in CPU_ONLY
    }

    # Beside an ONNX upload, the same file is a variant judged on the version's float samples.
    assert upload(ctl, "digits", mlp.path, samples=npz(X=mlp.calibration)).status_code == 201
    added = ctl.api(
        "POST",
        "/v1/models/digits/versions/1/variants",
        files={"file": (quantized.name, quantized.read_bytes(), "application/octet-stream")},
    )
    assert added.status_code == 201, added.text

    def judged() -> dict[str, Any] | None:
        body = ctl.api("GET", "/v1/models/digits/versions/1").json()
        found = next(v for v in body["variants"] if v["variant"] == "tflite-int8")
        return found if found["status"] in ("ready", "rejected", "failed") else None

    variant = wait_until(judged, 120, "the int8 TFLite variant judged")
    print(f"int8 TFLite with float I/O against the ONNX reference: {variant['status']} {variant['report']}")
    assert variant["status"] == "ready" and variant["precision"] == "int8", variant
    assert variant["report"]["top1_agreement"] >= 0.95
