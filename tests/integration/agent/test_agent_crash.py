"""Crash safety as a table: SIGKILL the agent at each stage of an update, restart, check.

Before the restart the persisted state must still name a model that works (the
old one until the new one is active); after it the device converges.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.agent.conftest import AgentProcess
from tests.integration.agent.peer import Peer, wait_until
from tests.integration.agent.test_agent_converge import infer
from tests.unit.agent.models import linear_model, write_model


def persisted(agent: AgentProcess) -> dict[str, Any]:
    path = agent.data_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def active_digest(agent: AgentProcess) -> str:
    return str(persisted(agent)["tenants"]["default"]["active"]["assignment"]["digest"])


@pytest.mark.parametrize("stage", ["desired_persisted", "manifest_on_disk", "mid_download", "activated"])
def test_sigkill_at_each_stage_keeps_a_working_model_and_converges_after_restart(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path, stage: str
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    m1, m2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    d1, d2 = write_model(m1, linear_model(21, 256, 64)), write_model(m2, linear_model(22, 256, 64))
    peer.add_artifact(m1)
    peer.add_artifact(m2)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)

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
