"""silero-vad uploaded with its sample inputs for microphone devices, rolled out to real agents.

The version's samples travel with each assignment: every agent fetches them by digest beside
the model and stages the model on them (zeros with free dimensions 1 are no valid silero-vad
input). The profile's microphone feeds the (batch, 576 samples) input as mono audio.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.realmodels import sample_inputs
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"
PROFILE = "raspberry-pi-4-4gb"
DEVICES = ("vad-a", "vad-b")


@pytest.mark.slow
def test_silero_with_samples_stages_on_microphone_devices(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    model = real_models("silero_vad")
    controller.cli("profiles", "register", str(PROFILES / f"{PROFILE}.toml"))
    for device_id in DEVICES:
        agent = register_agent(controller, tmp_path / "agents", device_id)
        controller.cli("devices", "set-profile", device_id, PROFILE)
        agents.append(agent.start())
    wait_until(
        lambda: all(controller.api("GET", f"/v1/devices/{d}").json()["online"] for d in DEVICES),
        60,
        "agents online",
    )
    samples = tmp_path / "vad.npz"
    np.savez(samples, **sample_inputs("silero_vad", 4))  # type: ignore[arg-type]
    controller.cli(
        "models", "upload", str(model), "--name", "vad", "--version", "1", "--sensor", "microphone",
        "--samples", str(samples), "--no-wait",
    )  # fmt: skip
    shown: dict[str, Any] = controller.cli("models", "show", "vad", "1")
    sample_digest = shown.get("sample_digest", "")
    assert sample_digest, shown

    args = ["rollouts", "create", "--model", "vad", "--version", "1"]
    for device_id in DEVICES:
        args += ["--device", device_id]
    rollout = controller.cli(*args)
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 180, "the rollout of vad")
    print(f"rollout: {final['status']}; devices: {[(d['device_id'], d['status']) for d in final['devices']]}")
    assert final["status"] == "succeeded", final
    assert {d["device_id"]: d["status"] for d in final["devices"]} == dict.fromkeys(DEVICES, "active")
    for agent in agents:
        # Staged on the version's samples, fetched by digest and kept beside the model.
        assert (agent.data_dir / "models" / f"{sample_digest}.npz").is_file()
