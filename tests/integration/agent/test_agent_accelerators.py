"""A real agent whose profile declares an accelerator this device's runtime lacks: it serves on
the CPU and its reported state says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgefleet_proto import fleet_pb2

from tests.support.agent_calls import infer, output
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


def accelerator_condition(peer: Peer) -> fleet_pb2.DeviceCondition | None:
    reported = peer.last_reported()
    if reported is None:
        return None
    return next((c for c in reported.conditions if c.kind == "accelerator_unavailable"), None)


def test_a_jetson_profile_on_a_cpu_only_runtime_serves_on_the_cpu_and_reports_why(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    agent.config.write_text(agent.config.read_text() + '[accelerator]\nruntime = "onnxruntime-tensorrt"\n')
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    # Before any model: the device says at once that its accelerator cannot be used.
    condition = wait_until(lambda: accelerator_condition(peer), 30, "accelerator condition")
    assert condition.message.startswith(
        "accelerator unavailable: onnxruntime-tensorrt: TensorrtExecutionProvider is not among this "
        f"onnxruntime's providers ({', '.join(ort.get_available_providers())})"
    )

    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(2, 16, 4))
    peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1"))
    peer.wait_active(digest)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(output(infer(agent, x)), expected)
    reported = peer.last_reported()
    assert reported is not None
    assert [c.kind for c in reported.conditions] == ["accelerator_unavailable"]
    assert "models run on the CPU" in agent.output()
