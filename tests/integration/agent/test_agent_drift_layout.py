"""A camera tenant's NHWC frames are sketched per colour channel, on a real agent over the broker.

The protocol peer plays the controller: an NHWC image classifier for a tenant fed by the
synthetic camera (uint8 frames, height x width x colour), with the drift spec the controller's
own drift math makes from a reference of frames like them. An unchanged camera must not look
like drift: the sketches the agent sends hold the three colour channels, and their PSI against
the reference stays stable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from edgefleet_proto import fleet_pb2
from onnx import TensorProto, helper, numpy_helper

from controller import drift
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.waiting import wait_until

SIZE = 32
FRAMES = 300


def nhwc_classifier(path: Path) -> Path:
    """image: float32[N, 32, 32, 3] -> probabilities[N, 4], from the frame's mean colour."""
    weights = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["colour"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["colour", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "nhwc_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def spec_from(reference: drift.SketchSpec) -> fleet_pb2.DriftSpec:
    spec = fleet_pb2.DriftSpec(
        tenant="door",
        model_name="cam",
        model_version="1",
        confidence_edges=list(reference.confidence_edges),
        num_classes=4,
    )
    for name, edges in reference.features.items():
        spec.features.add(name=name, edges=list(edges))
    return spec


def test_an_nhwc_camera_is_sketched_per_colour_channel_and_shows_no_drift(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    # Frames like the synthetic camera's (uniform bytes), scaled as the tenant scales them.
    frames = np.random.default_rng(7).integers(0, 256, (1000, SIZE, SIZE, 3)).astype(np.float64) / 255.0
    reference, baseline = drift.reference_baseline(frames)
    assert sorted(reference.features) == ["ch0", "ch1", "ch2"]

    agent = make_agent(telemetry_interval_s=0.5)
    with agent.config.open("a") as f:
        f.write(
            '\n[[tenants]]\nid = "door"\nmodel = "cam"\nrate_hz = 100\nqueue = 8\n'
            f'[tenants.source]\nkind = "synthetic"\nshape = "{SIZE},{SIZE},3"\nseed = 3\n'
            '[tenants.preprocess]\nscale = 0.00392156862745098\nlayout = "nhwc"\n'
        )
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(nhwc_classifier(tmp_path / "cam.onnx"))
    peer.publish_state(
        fleet_pb2.DesiredState(
            device_id=agent.device_id,
            generation=1,
            models=[peer.assignment(digest, "1", name="cam", tenant="door")],
            drift_specs=[spec_from(reference)],
        )
    )
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest, tenant="door")

    def sketched() -> list[fleet_pb2.DriftSketch] | None:
        with peer.lock:
            sketches = [s for t in peer.telemetry for s in t.drift if s.tenant == "door"]
        return sketches if sum(s.samples for s in sketches) >= FRAMES else None

    sketches = wait_until(sketched, 60, f"sketches of {FRAMES} frames")
    assert {tuple(h.name for h in s.features) for s in sketches} == {("ch0", "ch1", "ch2")}
    window = drift.Sketch(
        samples=sum(s.samples for s in sketches),
        features={
            f"ch{i}": tuple(int(c) for c in np.sum([list(s.features[i].counts) for s in sketches], axis=0))
            for i in range(3)
        },
    )
    score = drift.score(baseline, window)
    assert score.psi < drift.PSI_MODERATE, score
    assert "not sketched or captured" not in agent.output()
