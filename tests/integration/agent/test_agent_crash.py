"""Crash safety as a table: SIGKILL the agent at each stage of an update, restart, check.

Before the restart the persisted state must still name a model that works (the
old one until the new one is active); after it the device converges.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from tests.support.agent_calls import infer, persisted, serving_first_of_two
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


def active_digest(agent: AgentProcess) -> str:
    return str(persisted(agent)["tenants"]["default"]["active"]["assignment"]["digest"])


@pytest.mark.parametrize("stage", ["desired_persisted", "manifest_on_disk", "mid_download", "activated"])
def test_sigkill_at_each_stage_keeps_a_working_model_and_converges_after_restart(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path, stage: str
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    d1, d2 = serving_first_of_two(agent, peer, tmp_path, 21)

    if stage == "desired_persisted":
        peer.paused.set()
    elif stage == "manifest_on_disk":
        peer.serve_limit = 0
    elif stage == "mid_download":
        peer.serve_limit = peer.chunks_sent + 5
    peer.publish_desired(2, peer.assignment(d2, "2"))

    if stage == "desired_persisted":
        wait_until(
            lambda: persisted(agent).get("desired", {}).get("generation") == 2, 20, "desired persisted"
        )
    elif stage == "manifest_on_disk":
        wait_until((agent.data_dir / "downloads" / d2 / "manifest.pb").exists, 20, "manifest on disk")
    elif stage == "mid_download":

        def five_chunks() -> bool:
            e = peer.entry("default", d2)
            return e is not None and e.bytes_have == 5 * peer.chunk_size

        wait_until(five_chunks, 20, "5 chunks on disk")
    else:
        peer.wait_active(d2)
    agent.kill()

    assert active_digest(agent) == (d2 if stage == "activated" else d1)
    assert (agent.data_dir / "models" / f"{active_digest(agent)}.onnx").exists()

    peer.paused.clear()
    peer.serve_limit = None
    agent.start()
    agent.wait_ready()
    peer.wait_active(d2)
    wait_until(lambda: persisted(agent).get("applied_generation") == 2, 20, "generation 2 applied")
    tenant = persisted(agent)["tenants"]["default"]
    assert tenant["active"]["assignment"]["digest"] == d2
    assert tenant["previous"]["assignment"]["digest"] == d1
    assert infer(agent, np.ones((1, 256), np.float32)).model_version == "2"


def entry_for(peer: Peer, digest: str) -> Any:
    return peer.entry("default", digest)


# state the agent is SIGKILLed in -> (model serving after the restart, the new one's outcome)
UPDATE_STATES = {
    "fetch": ("new", fleet_pb2.UPDATE_OUTCOME_SUCCEEDED),
    "verify": ("new", fleet_pb2.UPDATE_OUTCOME_SUCCEEDED),
    "stage": ("new", fleet_pb2.UPDATE_OUTCOME_SUCCEEDED),
    "activate": ("old", fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK),
    "probation": ("old", fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK),
    "commit": ("new", fleet_pb2.UPDATE_OUTCOME_SUCCEEDED),
    # Reached when probation fails: the new model on probation answers one request with an error.
    "rollback": ("old", fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK),
}


@pytest.mark.parametrize("state", list(UPDATE_STATES))
def test_sigkill_in_each_update_state_resumes_on_a_working_model_and_reports_the_outcome(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    state: str,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    d1, d2 = serving_first_of_two(agent, peer, tmp_path, 31)
    agent.terminate()

    # The fault-injection switch kills the agent right after it persisted `state`.
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", state)
    agent.start()
    agent.wait_ready()
    monkeypatch.delenv("EDGEFLEET_AGENT_KILL_AT")
    new = peer.assignment(d2, "2")
    if state == "rollback":
        new.probation_s, new.max_error_rate = 60.0, 0.0
    peer.publish_desired(2, new)
    if state == "rollback":
        wait_until(
            lambda: (e := entry_for(peer, d2)) is not None and e.update_state == "probation", 30, "probation"
        )
        with pytest.raises(grpc.RpcError):
            infer(agent, np.ones((1, 3), np.float32))  # the wrong shape: an error the probation counts
    assert agent.proc is not None
    agent.proc.wait(30)
    assert agent.proc.returncode == -9, agent.output()[-3000:]
    log = persisted(agent)
    assert log["updates"]["default"]["state"] == state
    # Whatever the state, the persisted active model is one that loads and answered a smoke inference.
    assert active_digest(agent) in (d1, d2)
    assert (agent.data_dir / "models" / f"{active_digest(agent)}.onnx").exists()

    agent.start()
    agent.wait_ready()
    serving, outcome = UPDATE_STATES[state]
    want, other = (d2, d1) if serving == "new" else (d1, d2)
    wait_until(lambda: (e := entry_for(peer, other if serving == "old" else want)) is not None
               and e.outcome == outcome, 30, f"outcome reported after a kill in {state}")  # fmt: skip
    reported = peer.last_reported()
    assert reported is not None
    active = [m for m in reported.models if m.phase == fleet_pb2.MODEL_PHASE_ACTIVE]
    assert [m.artifact_digest for m in active] == [want]
    assert infer(agent, np.ones((1, 256), np.float32)).model_version == ("2" if serving == "new" else "1")
    if serving == "old":
        failed = entry_for(peer, d2)
        assert failed.phase == fleet_pb2.MODEL_PHASE_FAILED
        why = "exceeds 0 during probation" if state == "rollback" else f"the agent restarted during {state}"
        assert why in failed.error
        assert persisted(agent)["updates"]["default"]["state"] == "rolled_back"
    else:
        assert persisted(agent)["updates"]["default"]["state"] == "committed"
        assert persisted(agent)["tenants"]["default"]["previous"]["assignment"]["digest"] == d1
    wait_until(lambda: "update_outcome" in peer.event_kinds(), 20, "update_outcome event")


def test_sigkill_while_a_superseded_probation_rolls_back_resumes_on_the_committed_model(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """v1 committed, v2 on probation, v3 wanted: killed as v2's rollback starts, the device ends on v3 over v1."""
    agent = make_agent()
    peer = make_peer(agent.device_id)
    models = [tmp_path / f"m{i}.onnx" for i in (1, 2, 3)]
    d1, d2, d3 = (write_model(m, linear_model(40 + i, 256, 64)) for i, m in enumerate(models))
    for m in models:
        peer.add_artifact(m)
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", "rollback")
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    monkeypatch.delenv("EDGEFLEET_AGENT_KILL_AT")
    peer.wait_active(d1)
    v2 = peer.assignment(d2, "2")
    v2.probation_s = 600.0
    peer.publish_desired(2, v2)
    wait_until(
        lambda: (e := entry_for(peer, d2)) is not None and e.update_state == "probation",
        30,
        "v2 on probation",
    )
    v3 = peer.assignment(d3, "3")
    v3.probation_s = 0.5
    peer.publish_desired(3, v3)
    assert agent.proc is not None
    agent.proc.wait(30)
    assert agent.proc.returncode == -9, agent.output()[-3000:]
    update = persisted(agent)["updates"]["default"]
    assert (update["assignment"]["model_version"], update["state"]) == ("2", "rollback")
    assert "superseded by linear 3" in update["reason"]
    tenant = persisted(agent)["tenants"]["default"]
    for installed in (tenant["active"], tenant["previous"]):
        assert (agent.data_dir / "models" / f"{installed['assignment']['digest']}.onnx").exists()

    agent.start()
    agent.wait_ready()
    wait_until(
        lambda: (e := entry_for(peer, d3)) is not None and e.outcome == fleet_pb2.UPDATE_OUTCOME_SUCCEEDED,
        30,
        "v3 committed",
    )
    tenant = persisted(agent)["tenants"]["default"]
    assert tenant["active"]["assignment"]["digest"] == d3
    assert tenant["previous"]["assignment"]["digest"] == d1, "v3's rollback target was v1, not v2"
    assert infer(agent, np.ones((1, 256), np.float32)).model_version == "3"
