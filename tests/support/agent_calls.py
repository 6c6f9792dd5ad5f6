"""Calls on a real agent process that several test modules make: Infer, the tenant results
stream, its persisted state, a first model served."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.tensors import from_arrays, to_numpy
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


def serving_first_of_two(agent: AgentProcess, peer: Peer, tmp_path: Path, seed: int) -> tuple[str, str]:
    """Two linear models on the peer (seeds ``seed`` and ``seed + 1``), the agent started and
    serving the first; returns both digests."""
    m1, m2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    d1, d2 = write_model(m1, linear_model(seed, 256, 64)), write_model(m2, linear_model(seed + 1, 256, 64))
    peer.add_artifact(m1)
    peer.add_artifact(m2)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)
    return d1, d2


def infer(agent: AgentProcess, x: np.ndarray, tenant: str = "") -> inference_pb2.InferResponse:
    req = inference_pb2.InferRequest(tenant=tenant, inputs=from_arrays({"x": x}))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return resp


def output(resp: inference_pb2.InferResponse, name: str = "y") -> np.ndarray:
    return to_numpy(resp.outputs[name], name)


class Stream:
    """A StreamResults call collecting results in the background."""

    def __init__(self, agent: AgentProcess, tenant: str, token: str) -> None:
        self.results: queue.Queue[inference_pb2.Result] = queue.Queue()
        self.error: grpc.RpcError | None = None
        stub = inference_pb2_grpc.TenantResultsStub(channel(agent))
        self.call = stub.StreamResults(
            inference_pb2.StreamResultsRequest(tenant=tenant), metadata=[("x-edgefleet-token", token)]
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for result in self.call:
                self.results.put(result)
        except grpc.RpcError as exc:
            self.error = exc

    def collect(self, count: int, timeout: float = 30.0) -> list[inference_pb2.Result]:
        got: list[inference_pb2.Result] = []
        wait_until(lambda: self._drain(got) >= count, timeout, f"{count} results")
        return got

    def _drain(self, into: list[inference_pb2.Result]) -> int:
        while True:
            try:
                into.append(self.results.get_nowait())
            except queue.Empty:
                return len(into)


def outputs(result: inference_pb2.Result) -> dict[str, np.ndarray]:
    return {name: to_numpy(t) for name, t in result.outputs.items()}


def persisted(agent: AgentProcess) -> dict[str, Any]:
    path = agent.data_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def channel(agent: AgentProcess) -> grpc.Channel:
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    agent.channels.append(channel)
    return channel
