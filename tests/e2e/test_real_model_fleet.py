"""Real third-party models reach real agent processes on CPU-only device classes: MediaPipe's
face detector (float32 kernels, float16-stored weights) and RapidOCR's text-direction classifier
(its static int8 variant), each answering over gRPC as the file does when run directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.tensors import to_numpy
from controller.model_runner import Runner
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.realmodels import face_image, sample_inputs
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"
DEVICES = {"pi4": "raspberry-pi-4-4gb", "zero": "raspberry-pi-zero-2-w"}


def variants_done(controller: Controller, name: str) -> dict[str, Any] | None:
    body: dict[str, Any] = controller.cli("models", "show", name, "1")
    return body if all(v["status"] not in ("pending", "running") for v in body["variants"]) else None


def active_digest(controller: Controller, device_id: str, name: str) -> str:
    device = controller.api("GET", f"/v1/devices/{device_id}").json()
    models = (device.get("reported") or {}).get("models", [])
    return next(
        (m["artifact_digest"] for m in models if m["phase"] == "active" and m["model_name"] == name), ""
    )


def roll_out(controller: Controller, name: str) -> None:
    args = ["rollouts", "create", "--model", name, "--version", "1"]
    for device_id in DEVICES:
        args += ["--device", device_id]
    rollout = controller.cli(*args)
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 180, f"the rollout of {name}")
    assert final["status"] == "succeeded", final
    assert {d["device_id"]: d["status"] for d in final["devices"]} == dict.fromkeys(DEVICES, "active")


@pytest.mark.slow
def test_real_models_run_on_cpu_only_agents_as_they_run_directly(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    face_path, cls_path = real_models("face_detection_short_range"), real_models("ppocr_cls")
    for profile in set(DEVICES.values()):
        controller.cli("profiles", "register", str(PROFILES / f"{profile}.toml"))
    for device_id, profile in DEVICES.items():
        agent = register_agent(controller, tmp_path / "agents", device_id)
        controller.cli("devices", "set-profile", device_id, profile)
        agents.append(agent.start())
    wait_until(
        lambda: all(controller.api("GET", f"/v1/devices/{d}").json()["online"] for d in DEVICES),
        60,
        "agents online",
    )

    controller.cli("models", "upload", str(face_path), "--name", "face", "--version", "1")
    roll_out(controller, "face")
    face = (face_image(128, (0.5, 0.5), 0.3).astype(np.float32) / 127.5 - 1.0)[None]
    blank = np.zeros_like(face)
    direct = Runner(face_path, "tflite")
    for agent in agents:
        assert active_digest(controller, agent.device_id, "face")
        for image, present in ((face, True), (blank, False)):
            response = agent.infer({"input": image})
            scores = to_numpy(response.outputs["classificators"])
            expected = direct.run([image])[1]
            print(
                f"face on {agent.device_id}: max |agent - LiteRT| = {float(np.abs(scores - expected).max())}"
            )
            np.testing.assert_allclose(scores, expected, atol=1e-4)
            assert bool(1 / (1 + np.exp(-scores.astype(np.float64).max())) > 0.5) == present

    npz = tmp_path / "cls.npz"
    samples = sample_inputs("ppocr_cls", 8)
    np.savez(npz, **samples)
    controller.cli(
        "models", "upload", str(cls_path), "--name", "textdir", "--version", "1", "--calibration", str(npz),
    )  # fmt: skip
    variants = {
        v["variant"]: v
        for v in wait_until(lambda: variants_done(controller, "textdir"), 240, "variants")["variants"]
    }
    assert variants["onnx-int8-static"]["status"] == "ready", variants
    roll_out(controller, "textdir")
    int8 = controller.cli("models", "show", "textdir", "1")
    int8_digest = next(v["digest"] for v in int8["variants"] if v["variant"] == "onnx-int8-static")
    int8_file = next(p for p in controller.data_dir.rglob(int8_digest) if p.is_file())
    direct_int8, fp32 = Runner(int8_file, "onnx"), Runner(cls_path, "onnx")
    for agent in agents:
        assert active_digest(controller, agent.device_id, "textdir") == int8_digest
        x = samples["x"][:1]
        got = to_numpy(agent.infer({"x": x}).outputs["save_infer_model/scale_0.tmp_1"])
        want, reference = direct_int8.run([x])[0], fp32.run([x])[0]
        print(
            f"textdir int8 on {agent.device_id}: max |agent - onnxruntime| = {float(np.abs(got - want).max())},"
            f" max |int8 - fp32| = {float(np.abs(got - reference).max())}"
        )
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert got.argmax() == reference.argmax()
