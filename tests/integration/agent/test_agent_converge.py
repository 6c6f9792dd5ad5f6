"""The real agent process against a real Mosquitto and the protocol peer."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from tests.support.agent_calls import infer, output, serving_first_of_two
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_converges_and_serves_what_onnxruntime_computes(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path, protocol: str
) -> None:
    agent = make_agent(protocol=protocol)
    peer = make_peer(agent.device_id)
    model = tmp_path / "m1.onnx"
    digest = write_model(model, linear_model(1, 256, 64))
    peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1"))

    agent.start()
    agent.wait_ready()
    reported = peer.wait_active(digest)
    wait_until(lambda: (r := peer.last_reported()) is not None and r.applied_generation == 1, 10, "applied=1")
    assert reported.device_id == agent.device_id

    x = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
    resp = infer(agent, x)
    expected = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(output(resp), expected)
    assert (resp.model_name, resp.model_version) == ("linear", "1")

    wait_until(lambda: {"download_started", "model_activated"} <= set(peer.event_kinds()), 10, "events")
    assert any(s.online for s in peer.statuses)
    listed = agent.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    assert [(m.tenant, m.artifact_digest, m.inputs[0].shape) for m in listed] == [
        ("default", digest, [-1, 256])
    ]
    health = agent.stub().Health(inference_pb2.HealthRequest(), timeout=5)
    assert (health.status, health.broker_connected, health.models_loaded) == ("serving", True, 1)
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o660


def test_sigterm_publishes_offline_itself_and_exits_cleanly(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer]
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: any(s.online for s in peer.statuses), 10, "online status")
    assert agent.terminate() == 0
    wait_until(lambda: not peer.statuses[-1].online, 10, "offline status")
    assert "agent stopped" in agent.output()


def test_kill_9_leaves_the_last_will(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer]
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: any(s.online for s in peer.statuses), 10, "online status")
    agent.kill()
    # Mosquitto sends the will once it notices the dead socket (at once for a closed one).
    wait_until(lambda: not peer.statuses[-1].online, 30, "last will")


def test_model_that_no_longer_loads_at_start_falls_back_to_the_previous(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    _, d2 = serving_first_of_two(agent, peer, tmp_path, 11)
    x = np.ones((1, 256), np.float32)
    v1 = output(infer(agent, x))
    peer.publish_desired(2, peer.assignment(d2, "2"))
    peer.wait_active(d2)
    assert infer(agent, x).model_version == "2"
    assert agent.terminate() == 0

    (agent.data_dir / "models" / f"{d2}.onnx").write_bytes(b"bit rot")
    agent.start()
    agent.wait_ready()
    resp = infer(agent, x)
    assert resp.model_version == "1"
    np.testing.assert_array_equal(output(resp), v1)

    def failed() -> bool:
        e = peer.entry("default", d2)
        return e is not None and e.phase == fleet_pb2.MODEL_PHASE_FAILED and "cannot load" in e.error

    wait_until(failed, 20, "FAILED entry for the model that does not load")
    assert "model failed to load at start" in agent.output()
    assert not (agent.data_dir / "models" / f"{d2}.onnx").exists()

    # A newer generation with the same artifact fetches it again.
    peer.publish_desired(3, peer.assignment(d2, "2"))
    peer.wait_active(d2)
    assert infer(agent, x).model_version == "2"
