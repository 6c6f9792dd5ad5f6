"""The local API opens only once the agent knows its tenants: an app that connects the moment
the socket appears (as apps waiting on the socket file do) is answered for its configured
tenant, never told the tenant has no pipeline. A real agent process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from tests.support.agent_process import AgentProcess

pytestmark = pytest.mark.slow


def first_answer(agent: AgentProcess) -> str:
    """Wait for the socket with a tight poll, then open the tenant's results stream at once:
    what it said within a second ("" while it stays open without an error)."""
    deadline = time.monotonic() + 60
    while not agent.socket.exists():
        assert time.monotonic() < deadline and agent.alive(), agent.output()
        time.sleep(0.001)
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        call = inference_pb2_grpc.TenantResultsStub(channel).StreamResults(
            inference_pb2.StreamResultsRequest(tenant="rows"), timeout=1.0
        )
        try:
            next(iter(call))
        except grpc.RpcError as e:
            return "" if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED else f"{e.code().name}: {e.details()}"
        return ""


def test_a_configured_tenant_is_known_as_soon_as_the_socket_appears(
    make_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = make_agent()
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, np.zeros((4, 3)), delimiter=",")
    with agent.config.open("a") as f:
        f.write(
            f'\n[[tenants]]\nid = "rows"\nmodel = "absent"\n[tenants.source]\nkind = "csv"\nuri = "{rows}"\n'
        )
    answers = []
    for _ in range(5):
        agent.start()
        answers.append(first_answer(agent))
        agent.wait_ready()
        assert agent.terminate() == 0
        agent.socket.unlink(missing_ok=True)
    assert answers == [""] * 5, answers
