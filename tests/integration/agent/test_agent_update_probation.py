"""Probation on the real agent: a model that fails on live inputs is rolled back by the agent itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from edgefleet_proto import fleet_pb2, inference_pb2

from tests.e2e.rollout_fleet import classifier, digits_samples
from tests.integration.agent.conftest import AgentProcess
from tests.integration.agent.peer import Peer, wait_until
from tests.localfleet import from_tensor, to_tensors
from tests.models import dense_of_size


def infer_x(agent: AgentProcess, x: np.ndarray) -> inference_pb2.InferResponse | None:
    req = inference_pb2.InferRequest()
    req.inputs["X"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))
    try:
        resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    except grpc.RpcError:
        return None
    return resp


def test_error_rate_over_the_limit_during_probation_rolls_back_to_the_previous_model(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    d1 = peer.add_artifact(classifier(good, seed=1))
    d2 = peer.add_artifact(classifier(bad, seed=1, faulty=True))
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)

    on_probation = peer.assignment(d2, "2")
    on_probation.probation_s = 60.0
    on_probation.max_error_rate = 0.2
    peer.publish_desired(2, on_probation)

    def probation() -> bool:
        e = peer.entry("default", d2)
        return e is not None and e.phase == fleet_pb2.MODEL_PHASE_PROBATION and e.update_state == "probation"

    wait_until(probation, 30, "version 2 on probation")
    samples = digits_samples()
    bright = samples[samples.max(axis=1) >= 16][:10]
    answers = [infer_x(agent, x[None, :]) for x in bright]
    assert any(a is None for a in answers), "the faulty version refuses bright inputs"

    def rolled_back() -> fleet_pb2.ModelStatus | None:
        e = peer.entry("default", d2)
        return e if e is not None and e.outcome == fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK else None

    failed = wait_until(rolled_back, 20, "the agent to roll back on its own")
    assert failed.phase == fleet_pb2.MODEL_PHASE_FAILED and "error rate" in failed.error
    active = peer.entry("default", d1)
    assert active is not None and active.phase == fleet_pb2.MODEL_PHASE_ACTIVE
    answer = infer_x(agent, bright[0][None, :])
    assert answer is not None and answer.model_version == "1", "the previous model serves again"
    wait_until(lambda: {"model_rolled_back", "update_outcome"} <= set(peer.event_kinds()), 20, "events")


def test_an_update_that_cannot_fit_beside_the_held_previous_model_fails_and_the_old_one_serves(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    """The previous model stays loaded for rollback during probation, so the budget must hold both."""
    agent = make_agent()
    with agent.config.open("a") as f:
        f.write("[pool]\nmemory_budget_mb = 1.5\n")
    peer = make_peer(agent.device_id)
    v1 = dense_of_size(tmp_path / "v1.onnx", 1.0, seed=1)
    v2 = dense_of_size(tmp_path / "v2.onnx", 1.0, seed=2)
    d1, d2 = peer.add_artifact(v1), peer.add_artifact(v2)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)

    update = peer.assignment(d2, "2")
    update.probation_s = 1.0
    peer.publish_desired(2, update)

    def refused() -> fleet_pb2.ModelStatus | None:
        e = peer.entry("default", d2)
        return e if e is not None and e.outcome == fleet_pb2.UPDATE_OUTCOME_FAILED else None

    failed = wait_until(refused, 30, "the update refused for want of memory")
    assert failed.phase == fleet_pb2.MODEL_PHASE_FAILED
    assert (
        "needs 1.0 MB but 1.0 MB of the 1.5 MB model memory budget are in use "
        "(1.0 MB by linear 1 of tenant default, kept loaded for rollback until its update ends)"
    ) in failed.error
    active = peer.entry("default", d1)
    assert active is not None and active.phase == fleet_pb2.MODEL_PHASE_ACTIVE
    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    response = agent.stub().Infer(inference_pb2.InferRequest(inputs=to_tensors({"x": x})), timeout=10)
    assert response.model_version == "1", "the current model never stopped serving"
    want = ort.InferenceSession(str(v1)).run(None, {"x": x})[0]
    np.testing.assert_allclose(from_tensor(response.outputs["y"]), want, rtol=1e-4, atol=1e-4)
    outcome = wait_until(
        lambda: [e for e in peer.events if e.kind == "update_outcome" and e.attributes["version"] == "2"],
        20,
        "the update_outcome event",
    )
    assert outcome[0].attributes["outcome"] == "failed"

    # With a budget for both, the same artifact (kept on disk: it was sound) goes through probation.
    assert agent.terminate() == 0
    agent.config.write_text(
        agent.config.read_text().replace("memory_budget_mb = 1.5", "memory_budget_mb = 2.5")
    )
    asked = len(peer.requests)
    agent.start()
    agent.wait_ready()
    peer.publish_desired(3, update)

    def committed() -> fleet_pb2.ModelStatus | None:
        e = peer.entry("default", d2)
        return e if e is not None and e.outcome == fleet_pb2.UPDATE_OUTCOME_SUCCEEDED else None

    assert wait_until(committed, 30, "the update committed").phase == fleet_pb2.MODEL_PHASE_ACTIVE
    assert not [r for r in peer.requests[asked:] if r.digest == d2], "the refused artifact was kept"
