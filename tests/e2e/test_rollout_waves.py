"""Staged rollouts over 20 devices (5 agent processes, 15 simulated) and a real mosquitto.

A good version goes through three waves to 100 % while the controller is killed
mid-wave and the broker restarts; a version that raises on most inputs and one
that is many times slower are stopped at the first wave and every touched
device is put back on the previous version, with the reason in the event log;
a device offline during all of it comes back on the old version.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller
from tests.support.rollout_fleet import Fleet, classifier, first_version_everywhere, fleet_of_20
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def staged(fleet: Fleet, version: str, latency_ratio: float = 3.0) -> dict[str, object]:
    created: dict[str, object] = fleet.controller.cli(
        "rollouts", "create", "--model", "clf", "--version", version,
        "--all", "--wave", "20%:2", "--wave", "40%:2", "--wave", "100%:2",
        "--max-error-rate", "0.05", "--max-latency-ratio", str(latency_ratio), "--min-inferences", "10",
        "--min-reporting", "0.5", "--on-failure", "rollback", "--device-timeout", "60",
    )  # fmt: skip
    return created


def test_good_version_reaches_every_device_in_three_waves_through_a_controller_kill_and_a_broker_restart(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    with fleet_of_20(controller, tmp_path / "agents", agents) as fleet:
        v1 = fleet.upload(classifier(tmp_path / "v1.onnx", seed=1), "1")
        v2 = fleet.upload(classifier(tmp_path / "v2.onnx", seed=2), "2")
        first_version_everywhere(fleet, v1)

        # Killing and restarting the controller on the same two cores slows every device for
        # seconds; the latency gate gets room for that (the slow version is far beyond it).
        rollout = staged(fleet, "2", latency_ratio=10.0)
        assert [len([d for d in rollout["devices"] if d["wave"] == w]) for w in (1, 2, 3)] == [4, 8, 8]  # type: ignore[attr-defined]
        rid = str(rollout["id"])

        # Kill the controller once the second wave has started, then bring it back.
        fleet.wait_wave(rid, 2, 120)
        controller.stop(signal.SIGKILL)
        time.sleep(1)
        controller.start()
        # And the broker goes away and comes back while the rollout goes on.
        fleet.wait_wave(rid, 3, 120)
        broker.stop()
        time.sleep(2)
        broker.start()

        final = fleet.wait_finished(rid, 180)
        assert (final["state"], final["status"]) == ("succeeded", "succeeded"), (
            f"{final['state']}: {final['reason']}\nevents: {fleet.events(rid)}"
        )
        assert set(fleet.active_digests().values()) == {v2["digest"]}
        for agent in agents:
            assert agent.infer({"X": fleet.samples[:1]}).model_version == "2"

        events = fleet.events(rid)
        assert [e["wave"] for e in events if e["kind"] == "start_wave"] == [1, 2, 3]
        sent = Counter(e["device_id"] for e in events if e["kind"] == "set_desired")
        assert sorted(sent) == fleet.ids and set(sent.values()) == {1}, "each device set exactly once"
        assert events[-1]["kind"] == "complete"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [({"faulty": True}, "error rate"), ({"slow": True}, "p95 latency")],
    ids=["raises", "slow"],
)
def test_bad_version_is_stopped_at_the_first_wave_and_rolled_back_everywhere_it_went(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    tmp_path: Path,
    bad: dict[str, bool],
    reason: str,
) -> None:
    with fleet_of_20(controller, tmp_path / "agents", agents) as fleet:
        v1 = fleet.upload(classifier(tmp_path / "v1.onnx", seed=1), "1")
        fleet.upload(classifier(tmp_path / "v3.onnx", seed=1, **bad), "3")
        first_version_everywhere(fleet, v1)
        # dev-03 is in the first wave and offline for the whole rollout.
        fleet.sim_fleet.offline(["dev-03"])
        wait_until(lambda: not fleet.device("dev-03")["online"], 30, "dev-03 offline")

        rollout = staged(fleet, "3")
        rid = str(rollout["id"])
        final = fleet.wait_finished(rid, 120)
        assert final["state"] == "rolled_back", f"{final['state']}: {final['reason']}\n{fleet.events(rid)}"
        assert reason in final["reason"] and final["reason"].startswith("wave 1 of 3"), (
            f"{final['reason']}\nevents: {fleet.events(rid)}"
        )
        events = fleet.events(rid)
        roll_back = [e for e in events if e["kind"] == "roll_back"]
        assert len(roll_back) == 1 and reason in roll_back[0]["reason"]
        assert [e["wave"] for e in events if e["kind"] == "start_wave"] == [1]
        first_wave = [d["device_id"] for d in final["devices"] if d["wave"] == 1]
        assert sorted(e["device_id"] for e in events if e["kind"] == "revert_desired") == first_wave
        assert {d["status"] for d in final["devices"] if d["wave"] > 1} == {"waiting"}

        online_first_wave = [d for d in first_wave if d != "dev-03"]
        wait_until(
            lambda: all(fleet.active_digests()[d] == v1["digest"] for d in online_first_wave),
            60,
            "the first wave back on version 1",
        )
        real = next(a for a in agents if a.device_id == "dev-00")
        assert real.infer({"X": np.zeros((1, 64), np.float32)}).model_version == "1"

        # The offline device comes back after the rollback and ends on the old version.
        fleet.sim_fleet.online(["dev-03"])
        wait_until(lambda: fleet.device("dev-03")["online"], 30, "dev-03 back")

        def converged() -> bool:
            d = fleet.device("dev-03")
            r = d.get("reported") or {}
            return bool(r) and r["applied_generation"] == d["desired_generation"]

        wait_until(converged, 30, "dev-03 converged")
        assert fleet.active_digests()["dev-03"] == v1["digest"]
        assert set(fleet.active_digests().values()) == {v1["digest"]}
