"""A plain rollout end to end: real mosquitto, the controller process, agent processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.tensors import to_numpy
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until


def device(controller: Controller, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = controller.api("GET", f"/v1/devices/{device_id}").json()
    return body


def active_digest(controller: Controller, device_id: str) -> str | None:
    reported = device(controller, device_id).get("reported") or {}
    for m in reported.get("models", []):
        if m["phase"] == "active":
            return str(m["artifact_digest"])
    return None


def test_model_rolled_out_to_three_agents_answers_and_reports(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    version = controller.cli(
        "models",
        "upload",
        str(digits.path),
        "--name",
        "digits",
        "--version",
        "1",
        "--metadata",
        '{"task": "digits"}',
    )
    assert version["inputs"][0]["name"] == "X"
    assert {o["name"] for o in version["outputs"]} == {"label", "probabilities"}
    assert controller.cli("models", "list")[0]["versions"][0]["digest"] == version["digest"]

    for i in range(3):
        agents.append(register_agent(controller, tmp_path / "agents", f"dev-{i}").start())
    wait_until(lambda: all(d["online"] for d in controller.cli("devices", "list")), 60, "three agents online")

    rollout = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", "1",
        "--device", "dev-0", "--device", "dev-1", "--device", "dev-2",
    )  # fmt: skip
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 90, "the rollout to finish")
    assert final["status"] == "succeeded", final
    assert {d["status"] for d in final["devices"]} == {"active"}
    for a in agents:
        assert active_digest(controller, a.device_id) == version["digest"]

    reference = ort.InferenceSession(str(digits.path))
    want_label, want_proba = reference.run(None, {"X": digits.samples[:20]})
    for a in agents:
        response = a.infer({"X": digits.samples[:20]})
        assert (response.model_name, response.model_version) == ("digits", "1")
        np.testing.assert_array_equal(to_numpy(response.outputs["label"]), want_label)
        np.testing.assert_allclose(to_numpy(response.outputs["probabilities"]), want_proba, rtol=1e-6)
        assert response.outputs["label"].dtype == "int64"

    for _ in range(30):
        agents[0].infer({"X": digits.samples[:1]})

    def telemetry_with_inferences() -> list[dict[str, Any]] | None:
        # The 31 calls may straddle telemetry windows: wait until every one has been reported.
        rows: list[dict[str, Any]] = controller.cli("telemetry", "dev-0", "--limit", "50")
        hits = [m for r in rows for m in r["models"] if m["inference_count"] > 0]
        return hits if sum(m["inference_count"] for m in hits) >= 31 else None

    stats = wait_until(telemetry_with_inferences, 30, "telemetry reporting all 31 inferences")
    assert sum(m["inference_count"] for m in stats) >= 31
    assert all(m["model_name"] == "digits" and m["error_count"] == 0 for m in stats)
    assert all(0 < m["latency_p50_ms"] <= m["latency_p95_ms"] <= m["latency_p99_ms"] for m in stats)
    row = controller.cli("telemetry", "dev-0", "--limit", "1")[0]
    assert row["system"]["mem_total_bytes"] > 0 and 0 <= row["system"]["cpu_percent"] <= 100 * 64
    events = controller.cli("events", "dev-0", "--limit", "50")
    assert "model_activated" in {e["kind"] for e in events}


def test_device_cannot_touch_another_devices_topics(
    broker: Broker, controller: Controller, tmp_path: Path
) -> None:

    creds = {}
    for device_id in ("dev-a", "dev-b"):
        creds[device_id] = controller.api(
            "POST", "/v1/devices", json={"device_id": device_id, "tags": []}
        ).json()
    a = creds["dev-a"]
    peer = wait_until(
        lambda: _try_connect(broker.port, a["mqtt_username"], a["mqtt_password"]), 10, "dev-a connects"
    )
    try:
        assert not peer.publish("edgefleet/v1/devices/dev-a/events", b"").is_failure
        for topic in ("edgefleet/v1/devices/dev-b/telemetry", "edgefleet/v1/devices/dev-b/reported",
                      "edgefleet/v1/devices/dev-a/desired", "edgefleet/v1/devices/dev-b/artifact/response"):  # fmt: skip
            code = peer.publish(topic, b"x")
            assert code.is_failure and str(code) == "Not authorized", (topic, code)
    finally:
        peer.close()


def _try_connect(port: int, username: str, password: str) -> Any:
    from tests.support.mqtt_peer import Peer

    try:
        return Peer(port, username, password, client_id=f"{username}-probe")
    except (TimeoutError, ConnectionError, OSError):
        return None
