"""An update that kills the agent while staging, on real agent processes restarted as systemd would.

Each start finds the update persisted in ``stage`` and counts a crash; after
``[updates] max_attempts`` of them the update is failed with the reason, reported
with UPDATE_OUTCOME_FAILED, and the last committed model keeps serving: the agent
stays up instead of dying until systemd's StartLimitBurst stops it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from tests.integration.agent.conftest import AgentProcess
from tests.integration.agent.peer import Peer, wait_until
from tests.unit.agent.models import linear_model, write_model

REASON = "crashed the agent 3 times while staging"


def persisted(agent: AgentProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((agent.data_dir / "state.json").read_text())
    return doc


def served_version(agent: AgentProcess) -> str:
    x = np.ones((1, 256), np.float32)
    req = inference_pb2.InferRequest()
    req.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return str(resp.model_version)


def failed_with(peer: Peer, digest: str, reason: str) -> fleet_pb2.ModelStatus | None:
    e = peer.entry("default", digest)
    if e is None or (e.phase, e.outcome, e.error) != (
        fleet_pb2.MODEL_PHASE_FAILED,
        fleet_pb2.UPDATE_OUTCOME_FAILED,
        reason,
    ):
        return None
    return e


@pytest.mark.slow
def test_an_update_that_kills_the_agent_while_staging_is_failed_after_three_crashes_and_never_retried(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    models = [tmp_path / f"m{i}.onnx" for i in (1, 2, 3)]
    d1, d2, d3 = (write_model(m, linear_model(60 + i, 256, 64)) for i, m in enumerate(models))
    for m in models:
        peer.add_artifact(m)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)
    agent.terminate()

    # Version 2 kills the agent (SIGKILL) each time it is being staged, as a runtime's
    # segfault or the kernel's OOM killer would; systemd restarts the agent each time.
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", "stage")
    peer.publish_desired(2, peer.assignment(d2, "2"))
    for crashes in range(3):
        agent.start()
        assert agent.proc is not None
        agent.proc.wait(60)
        assert agent.proc.returncode == -9, agent.output()[-3000:]
        update = persisted(agent)["updates"]["default"]
        # Counted at each start, persisted before the next attempt.
        assert (update["assignment"]["model_version"], update["state"], update["crashes"]) == (
            "2",
            "stage",
            crashes,
        )
        assert persisted(agent)["tenants"]["default"]["active"]["assignment"]["digest"] == d1

    # The fourth start counts the third crash and fails the update; the agent stays up on version 1.
    agent.start()
    agent.wait_ready()
    failed = wait_until(lambda: failed_with(peer, d2, REASON), 30, "version 2 reported failed")
    assert failed.update_state == "failed"
    reported = peer.last_reported()
    assert reported is not None
    assert [
        (m.artifact_digest, m.phase) for m in reported.models if m.phase == fleet_pb2.MODEL_PHASE_ACTIVE
    ] == [(d1, fleet_pb2.MODEL_PHASE_ACTIVE)]
    assert served_version(agent) == "1"
    wait_until(
        lambda: any(e.kind == "update_outcome" and REASON in e.message for e in peer.events),
        20,
        "update_outcome event with the reason",
    )
    assert persisted(agent)["updates"]["default"]["state"] == "failed"

    # It is not tried again: not while this agent runs, not after another start, not when
    # another rollout assigns the same artifact in a newer generation.
    time.sleep(2)
    assert agent.proc is not None and agent.proc.poll() is None
    agent.terminate()
    agent.start()
    agent.wait_ready()
    peer.publish_desired(3, peer.assignment(d2, "2-again"))
    wait_until(
        lambda: (r := peer.last_reported()) is not None and r.desired_generation == 3, 20, "generation 3"
    )
    wait_until(lambda: failed_with(peer, d2, REASON), 20, "version 2 still failed in generation 3")
    assert served_version(agent) == "1"
    staged = re.findall(r"update state .* version=2\S* state=stage", agent.output())
    assert len(staged) == 3, "staged three times in all, each one a crash"
    assert agent.proc is not None and agent.proc.poll() is None

    # A newer artifact starts afresh, and is staged and served (it does not crash the agent).
    monkeypatch.delenv("EDGEFLEET_AGENT_KILL_AT")
    agent.terminate()
    agent.start()
    agent.wait_ready()
    peer.publish_desired(4, peer.assignment(d3, "3"))
    peer.wait_active(d3)
    assert served_version(agent) == "3"
    update = persisted(agent)["updates"]["default"]
    assert (update["assignment"]["model_version"], update["crashes"]) == ("3", 0)
