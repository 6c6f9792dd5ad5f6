"""An agent loads only what the models and tenants it serves need.

A real agent process, started with Python's import log on (PYTHONPROFILEIMPORTTIME,
what ``-X importtime`` prints), serves a TFLite model through LiteRT and answers Infer
calls. Every module it ever imported is in that log, and every shared library it
mapped is in /proc/PID/maps: onnxruntime must be in neither, LiteRT in both (so the
check can see a runtime when one is there), and with no camera or microphone tenant
neither OpenCV nor the audio library is loaded, nor X.509 parsing without a client
certificate. Before its model arrives, an agent
with nothing to serve has imported no runtime at all. An agent with its local API off
serves a tenant whose results go out over MQTT without ever loading gRPC.

Memory and import time themselves are measured in bench/agent_memory.py, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet_proto import inference_pb2

from agent.tensors import from_arrays
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.models import sine_float_tflite
from tests.support.waiting import wait_until

pytest.importorskip("ai_edge_litert.interpreter")

# Libraries only some agents need: the other runtime, cameras (OpenCV), microphones.
NOT_FOR_LITERT_ONLY = ("onnxruntime", "cv2", "sounddevice")


def imported(log: str) -> set[str]:
    """Every module the process imported, from its import log (``import time: ... | name``)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and "self [us]" not in line
    }


def packages(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_litert_only_agent_never_imports_onnxruntime(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    agent = make_agent()
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    assert agent.proc is not None
    at_start = packages(imported(agent.output()))
    assert "agent" in at_start, "the import log is not on: this test would prove nothing"
    runtimes = at_start & {"onnxruntime", "ai_edge_litert", "tflite_runtime"}
    assert not runtimes, f"an agent serving nothing imported {sorted(runtimes)}"

    a = peer.assignment(peer.add_artifact(sine_float_tflite(), fmt="tflite"), "1", name="sine")
    a.format, a.runtime = "tflite", "litert"
    peer.publish_desired(1, a)
    peer.wait_active(a.artifact_digest)
    x = np.full((1, 1), 0.5, np.float32)
    for _ in range(3):
        request = inference_pb2.InferRequest(inputs=from_arrays({"serving_default_dense_input:0": x}))
        reply = agent.stub().Infer(request, timeout=10)
        assert list(reply.outputs) == ["StatefulPartitionedCall:0"]
    libraries = mapped(agent.proc.pid)

    everything = imported(agent.output())
    modules = packages(everything)
    assert "ai_edge_litert" in modules and "libpywrap_litert" in libraries
    loaded = [p for p in NOT_FOR_LITERT_ONLY if p in modules]
    assert not loaded, f"a LiteRT-only agent imported {loaded}"
    # No client certificate to read: X.509 parsing stays unloaded (Ed25519 alone is needed).
    assert "cryptography.hazmat.primitives.asymmetric.ed25519" in everything
    assert "cryptography.x509" not in everything
    assert "onnxruntime" not in libraries, "a LiteRT-only agent mapped onnxruntime's library"
    assert agent.terminate() == 0


MQTT_ONLY = """
[api]
enabled = false
[[tenants]]
id = "vibration"
queue = 4
rate_hz = 50
results = ["mqtt"]
[tenants.source]
kind = "synthetic"
shape = "4"
"""


def test_an_agent_with_the_local_api_off_serves_over_mqtt_without_grpc(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    agent = make_agent()
    with agent.config.open("a") as f:
        f.write(MQTT_ONLY)
    peer = make_peer(agent.device_id)
    results: list[Any] = []
    topic = f"edgefleet/v1/devices/{agent.device_id}/results/vibration"
    peer.client.message_callback_add(topic, lambda client, userdata, msg: results.append(msg))
    peer.client.subscribe(topic, qos=1)
    model = tmp_path / "linear.onnx"
    write_model(model, linear_model(n_in=4))
    a = peer.assignment(peer.add_artifact(model), "1", tenant="vibration")
    peer.publish_desired(1, a)
    agent.start()
    agent.wait_ready()
    peer.wait_active(a.artifact_digest, tenant="vibration")

    wait_until(lambda: len(results) >= 3, 30, "results over MQTT")
    result = inference_pb2.Result.FromString(results[0].payload)
    assert result.tenant == "vibration" and list(result.outputs) == ["y"]
    assert agent.proc is not None
    libraries = mapped(agent.proc.pid)
    assert not agent.socket.exists()
    assert "onnxruntime" in libraries and "cygrpc" not in libraries
    assert "grpc" not in packages(imported(agent.output()))
    assert agent.terminate() == 0
