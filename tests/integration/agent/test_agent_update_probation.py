"""Probation on the real agent: a model that fails on live inputs is rolled back by the agent itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from edgefleet_proto import fleet_pb2, inference_pb2

from agent.tensors import from_arrays, to_numpy
from tests.support.agent_calls import persisted
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.models import dense_of_size
from tests.support.rollout_fleet import classifier, digits_samples
from tests.support.waiting import wait_until


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
    response = agent.stub().Infer(inference_pb2.InferRequest(inputs=from_arrays({"x": x})), timeout=10)
    assert response.model_version == "1", "the current model never stopped serving"
    want = ort.InferenceSession(str(v1)).run(None, {"x": x})[0]
    np.testing.assert_allclose(to_numpy(response.outputs["y"]), want, rtol=1e-4, atol=1e-4)
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


def on_probation(peer: Peer, digest: str) -> Callable[[], bool]:
    def check() -> bool:
        e = peer.entry("default", digest)
        return e is not None and e.phase == fleet_pb2.MODEL_PHASE_PROBATION and e.update_state == "probation"

    return check


def outcome_event(peer: Peer, version: str) -> Callable[[], fleet_pb2.Event | None]:
    def find() -> fleet_pb2.Event | None:
        with peer.lock:
            return next(
                (e for e in peer.events if e.kind == "update_outcome" and e.attributes["version"] == version),
                None,
            )

    return find


def test_a_newer_version_during_probation_falls_back_on_the_last_committed_model(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    """v1 committed, v2 on probation, v3 arrives: v3's rollback target is v1, never v2."""
    agent = make_agent()
    peer = make_peer(agent.device_id)
    d1 = peer.add_artifact(classifier(tmp_path / "v1.onnx", seed=1))
    d2 = peer.add_artifact(classifier(tmp_path / "v2.onnx", seed=2))
    d3 = peer.add_artifact(classifier(tmp_path / "v3.onnx", seed=3, faulty=True))
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)

    v2 = peer.assignment(d2, "2")
    v2.probation_s, v2.max_error_rate = 600.0, 0.2
    peer.publish_desired(2, v2)
    wait_until(on_probation(peer, d2), 30, "version 2 on probation")

    v3 = peer.assignment(d3, "3")
    v3.probation_s, v3.max_error_rate = 600.0, 0.2
    peer.publish_desired(3, v3)
    wait_until(on_probation(peer, d3), 30, "version 3 on probation")
    state = persisted(agent)
    assert state["tenants"]["default"]["previous"]["assignment"]["digest"] == d1, "v3 falls back on v1"
    superseded = wait_until(outcome_event(peer, "2"), 20, "version 2's outcome")
    assert superseded.attributes["outcome"] == "rolled_back"
    assert "superseded by linear 3 (desired generation 3)" in superseded.message

    samples = digits_samples()
    bright = samples[samples.max(axis=1) >= 16][:10]
    assert any(infer_x(agent, x[None, :]) is None for x in bright), "version 3 refuses bright inputs"
    failed = wait_until(outcome_event(peer, "3"), 20, "version 3 rolled back by its probation")
    assert failed.attributes["outcome"] == "rolled_back" and "error rate" in failed.message
    active = peer.wait_active(d1)
    assert [m.artifact_digest for m in active.models if m.phase == fleet_pb2.MODEL_PHASE_ACTIVE] == [d1]
    answer = infer_x(agent, bright[0][None, :])
    assert answer is not None and answer.model_version == "1", "version 1 serves, not version 2"
    assert persisted(agent)["tenants"]["default"]["active"]["assignment"]["digest"] == d1


def test_the_controller_rolling_back_during_probation_serves_the_previous_model_without_a_download(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    d1 = peer.add_artifact(classifier(tmp_path / "v1.onnx", seed=1))
    d2 = peer.add_artifact(classifier(tmp_path / "v2.onnx", seed=2))
    v1 = peer.assignment(d1, "1")
    peer.publish_desired(1, v1)
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)
    v2 = peer.assignment(d2, "2")
    v2.probation_s = 600.0
    peer.publish_desired(2, v2)
    wait_until(on_probation(peer, d2), 30, "version 2 on probation")

    asked = len(peer.requests)
    peer.publish_desired(3, v1)
    wait_until(lambda: persisted(agent).get("applied_generation") == 3, 20, "generation 3 applied")
    reported = peer.wait_active(d1)
    assert [m.artifact_digest for m in reported.models] == [d1]
    assert peer.requests[asked:] == [], "nothing was downloaded"
    x = digits_samples()[:1]
    answer = infer_x(agent, x)
    assert answer is not None and answer.model_version == "1"
    rolled_back = wait_until(outcome_event(peer, "2"), 20, "version 2's outcome")
    assert rolled_back.attributes["outcome"] == "rolled_back"
    assert "the controller rolled back to linear 1 (desired generation 3)" in rolled_back.message
    tenant = persisted(agent)["tenants"]["default"]
    assert tenant["active"]["assignment"]["digest"] == d1 and tenant["previous"] is None
    # The candidate is released: not loaded, and its file removed once the device converged.
    wait_until(lambda: not (agent.data_dir / "models" / f"{d2}.onnx").exists(), 20, "version 2 removed")
