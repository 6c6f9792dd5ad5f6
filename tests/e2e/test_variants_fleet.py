"""Variants end to end: a mixed fleet of agent processes, each in a device profile, gets the
variant its profile should run; a device no variant fits is skipped with the reason; an agent
that does not trust the signer refuses and keeps serving; a signed key rotation is followed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.tensors import to_numpy
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_mlp, tflite_mlp
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"

# An Armv7 board with LiteRT only and no int8 kernels: nothing in the registry fits it.
OLD_BOARD = """schema_version = 1
id = "armv7-legacy-cam"
name = "Armv7 legacy camera"
vendor = "Example"

[cpu]
architecture = "armv7l"
model = "Cortex-A7 dual-core"
cores = 2
max_frequency_mhz = 1000

[memory]
ram_mb = 256
model_budget_mb = 32

[storage]
kind = "nand"
capacity_gb = 1

[runtimes]
litert = "1.2.0"

[inference]
precisions = ["fp32"]
preferred_precision = "fp32"
"""


def reported_active(controller: Controller, device_id: str) -> dict[str, Any] | None:
    device = controller.api("GET", f"/v1/devices/{device_id}").json()
    active = [m for m in (device.get("reported") or {}).get("models", []) if m["phase"] == "active"]
    return active[0] if active else None


def all_variants_done(controller: Controller, name: str, version: str) -> dict[str, Any] | None:
    body: dict[str, Any] = controller.cli("models", "show", name, version)
    return body if all(v["status"] not in ("pending", "running") for v in body["variants"]) else None


def test_each_profile_gets_its_variant_and_an_incompatible_device_is_skipped(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    for name in ("raspberry-pi-zero-2-w", "jetson-orin-nano-8gb", "coral-dev-board"):
        assert controller.cli("profiles", "register", str(PROFILES / f"{name}.toml"))["id"] == name
    (tmp_path / "armv7-legacy-cam.toml").write_text(OLD_BOARD)
    controller.cli("profiles", "register", str(tmp_path / "armv7-legacy-cam.toml"))

    mlp = digits_mlp(tmp_path / "mlp.onnx")
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, X=mlp.calibration)
    version = controller.cli(
        "models", "upload", str(mlp.path), "--name", "digits", "--version", "1",
        "--calibration", str(calibration), "--metrics", '{"accuracy": 0.92}', "--fp16",
    )  # fmt: skip
    # The upload answers with every variant it will produce; quantization runs in the background
    # (how far it got by now depends on the machine's load, so only the fp32 original is known,
    # and its copy at the IR version its content needs: the installed onnx writes IR 14).
    assert {v["variant"] for v in version["variants"]} == {
        "onnx-fp32", "onnx-fp32-ir8", "onnx-int8-static", "onnx-fp16",
    }  # fmt: skip
    assert next(v for v in version["variants"] if v["variant"] == "onnx-fp32")["status"] == "ready"
    int8_tflite = tflite_mlp(tmp_path / "mlp-int8.tflite", mlp.layers, int8=True, calibration=mlp.calibration)
    controller.cli("models", "add-variant", "digits", "1", str(int8_tflite))
    done = wait_until(lambda: all_variants_done(controller, "digits", "1"), 120, "variants produced")
    variants = {v["variant"]: v for v in done["variants"]}
    assert {k: v["status"] for k, v in variants.items()} == {
        "onnx-fp32": "ready",
        "onnx-fp32-ir8": "ready",
        "onnx-int8-static": "ready",
        "onnx-fp16": "ready",
        "tflite-int8": "ready",
    }, variants
    assert variants["onnx-int8-static"]["report"]["top1_agreement"] >= 0.99

    expected = {"pi-zero": "onnx-int8-static", "jetson": "onnx-fp16", "coral": "tflite-int8"}
    profile_of = {
        "pi-zero": "raspberry-pi-zero-2-w",
        "jetson": "jetson-orin-nano-8gb",
        "coral": "coral-dev-board",
        "old-cam": "armv7-legacy-cam",
    }
    for device_id in expected:
        agent = register_agent(controller, tmp_path / "agents", device_id)
        controller.cli("devices", "set-profile", device_id, profile_of[device_id])
        agents.append(agent.start())
    controller.cli("devices", "register", "old-cam", "--profile", "armv7-legacy-cam")
    wait_until(
        lambda: all(controller.api("GET", f"/v1/devices/{d}").json()["online"] for d in expected),
        60,
        "agents online",
    )

    args = ["rollouts", "create", "--model", "digits", "--version", "1"]
    for device_id in profile_of:
        args += ["--device", device_id]
    rollout = controller.cli(*args)
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    statuses = {d["device_id"]: (d["status"], d["detail"]) for d in final["devices"]}
    assert final["status"] == "succeeded", (final["status"], statuses, final.get("reason"))
    assert {d: s for d, (s, _) in statuses.items()} == {
        "pi-zero": "active",
        "jetson": "active",
        "coral": "active",
        "old-cam": "skipped",
    }
    assert statuses["old-cam"][1].startswith("no variant fits profile armv7-legacy-cam: ")
    assert (
        "needs onnxruntime" in statuses["old-cam"][1]
        and "precision int8 is not supported" in statuses["old-cam"][1]
    )

    reference = ort.InferenceSession(str(mlp.path)).run(None, {"X": mlp.samples})[0].argmax(axis=1)
    for agent in agents:
        want = variants[expected[agent.device_id]]
        active = reported_active(controller, agent.device_id)
        assert active is not None and active["artifact_digest"] == want["digest"], (agent.device_id, active)
        x = mlp.samples
        if (
            want["format"] == "tflite"
        ):  # the int8 TFLite model takes int8 input (scale 1/255, zero point -128)
            x = np.clip(np.round(x * 255 - 128), -128, 127).astype(np.int8)
            response = agent.infer({"input": x})
            logits = to_numpy(response.outputs["fc1"])
        else:
            response = agent.infer({"X": x})
            logits = to_numpy(response.outputs["logits"])
        assert (response.model_name, response.model_version) == ("digits", "1")
        assert np.mean(logits.argmax(axis=1) == reference) >= 0.98, agent.device_id


def _pin(agent: AgentProcess, key_hex: str) -> None:
    lines = agent.config.read_text().splitlines()
    agent.config.write_text(
        "\n".join(
            f'controller_public_key = "{key_hex}"' if ln.startswith("controller_public_key") else ln
            for ln in lines
        )
        + "\n"
    )


def test_wrong_signer_is_refused_with_the_model_kept_and_a_signed_rotation_is_followed(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    mlp = digits_mlp(tmp_path / "mlp.onnx")
    other = digits_mlp(tmp_path / "mlp2.onnx", hidden=16)
    controller.cli("models", "upload", str(mlp.path), "--name", "digits", "--version", "1")
    controller.cli("models", "upload", str(other.path), "--name", "digits", "--version", "2", "--parent", "1")
    trusting = register_agent(controller, tmp_path / "agents", "trusting")
    doubting = register_agent(controller, tmp_path / "agents", "doubting")
    sleeper = register_agent(controller, tmp_path / "agents", "sleeper")
    agents += [trusting.start(), doubting.start(), sleeper.start()]

    def roll(version: str, *devices: str) -> dict[str, Any]:
        args = ["rollouts", "create", "--model", "digits", "--version", version]
        for d in devices:
            args += ["--device", d]
        rollout = controller.cli(*args)
        return wait_until(lambda: rollout_done(controller, rollout["id"]), 90, f"rollout of {version}")

    assert roll("1", "trusting", "doubting", "sleeper")["status"] == "succeeded"
    # The sleeper is off through both rotations below.
    sleeper.stop()

    # The doubting device is re-provisioned to trust another controller key.
    doubting.stop()
    forged = Ed25519PrivateKey.generate().public_key()
    _pin(doubting, forged.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex())
    doubting.start()
    final = roll("2", "trusting", "doubting")
    by_device = {d["device_id"]: d for d in final["devices"]}
    assert by_device["trusting"]["status"] == "active"
    assert by_device["doubting"]["status"] == "failed"
    assert "refused: signed by key" in by_device["doubting"]["detail"]
    response = doubting.infer({"X": mlp.samples[:3]})
    assert response.model_version == "1"  # still serving the model it had
    # It refused the whole desired state, which the controller's key signed, and said so.
    events = controller.cli("events", "doubting", "--limit", "50")
    assert any(e["kind"] == "payload_rejected" and "signed by key" in e["message"] for e in events), events

    # Rotation: the new key travels with the first assignment it signed, vouched for by the old key.
    old_key = controller.api("GET", "/v1/signing-key").json()
    new_key = controller.api("POST", "/v1/signing-key/rotate").json()
    assert new_key["previous_key_id"] == old_key["key_id"] != new_key["key_id"]
    version = controller.cli("models", "show", "digits", "1")
    assert {v["key_id"] for v in version["variants"]} == {new_key["key_id"]}
    assert roll("1", "trusting")["status"] == "succeeded"
    pinned = json.loads((trusting.data_dir / "controller_key.json").read_text())
    assert pinned["public_key"] == new_key["public_key"]
    assert trusting.infer({"X": mlp.samples[:3]}).model_version == "1"

    # A second rotation; the sleeper wakes still pinning the first key and walks the chain.
    third_key = controller.api("POST", "/v1/signing-key/rotate").json()
    assert third_key["previous_key_id"] == new_key["key_id"]
    sleeper.start()
    final = roll("2", "trusting", "sleeper")
    assert {d["status"] for d in final["devices"]} == {"active"}, final
    for device in (trusting, sleeper):
        pinned = json.loads((device.data_dir / "controller_key.json").read_text())
        assert pinned["public_key"] == third_key["public_key"], device.data_dir
        assert device.infer({"X": mlp.samples[:3]}).model_version == "2"
