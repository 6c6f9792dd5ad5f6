"""Store-and-forward across a broker outage, working offline, and the broker's ACL."""

from __future__ import annotations

import logging
import queue
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgefleet_proto import inference_pb2
from edgefleet_proto.topics import Kind, Topic

from agent.config import MqttConfig
from agent.link import Link
from tests.support.agent_calls import infer, output
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


def outbox_rows(agent: AgentProcess, kind: str) -> int:
    db = sqlite3.connect(agent.data_dir / "outbox.db")
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()
        return int(count)
    finally:
        db.close()


def test_telemetry_made_during_an_outage_arrives_after_it_oldest_first(
    broker: Broker, make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer]
) -> None:
    agent = make_agent(telemetry_interval_s=0.2)
    peer = make_peer(agent.device_id, persistent=True)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: len(peer.telemetry) >= 2, 20, "telemetry before the outage")

    broker.stop()
    wait_until(lambda: outbox_rows(agent, "telemetry") >= 8, 20, "telemetry queued on disk")
    last_before = max(t.seq for t in peer.telemetry)
    broker.start()
    wait_until(lambda: peer.connected.is_set(), 10, "peer back")

    queued = outbox_rows(agent, "telemetry")
    wait_until(lambda: max(t.seq for t in peer.telemetry) >= last_before + queued, 60, "backlog delivered")
    seqs = [t.seq for t in peer.telemetry]
    first_seen: list[int] = []
    for s in seqs:
        if s not in first_seen:
            first_seen.append(s)
    assert first_seen == sorted(first_seen), "oldest first"
    assert first_seen == list(range(first_seen[0], first_seen[-1] + 1)), "nothing lost"
    assert all(t.device_id == agent.device_id and t.system.mem_total_bytes > 0 for t in peer.telemetry)
    assert all(t.outbox_dropped == 0 for t in peer.telemetry)


def test_serves_from_disk_without_a_broker_then_reconnects(
    broker: Broker,
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(8, 256, 64))
    peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest)
    x = np.ones((2, 256), dtype=np.float32)
    before = output(infer(agent, x))
    assert agent.terminate() == 0

    broker.stop()
    agent.start()
    agent.wait_ready()
    health = agent.stub().Health(inference_pb2.HealthRequest(), timeout=5)
    assert (health.status, health.broker_connected, health.models_loaded) == ("serving", False, 1)
    np.testing.assert_array_equal(output(infer(agent, x)), before)

    broker.start()
    wait_until(
        lambda: agent.stub().Health(inference_pb2.HealthRequest(), timeout=5).broker_connected,
        60,
        "reconnect",
    )


def test_infer_errors_are_statuses_with_messages(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(9, 256, 64))
    peer.add_artifact(model)
    agent.start()
    agent.wait_ready()
    stub = agent.stub()

    def code(req: inference_pb2.InferRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(req, timeout=5)
        err: Any = info.value
        return err.code(), err.details()

    assert code(inference_pb2.InferRequest(tenant="nobody"))[0] == grpc.StatusCode.NOT_FOUND

    peer.paused.set()  # the tenant is assigned but its model cannot arrive yet
    peer.publish_desired(1, peer.assignment(digest, "1"))
    wait_until(lambda: peer.entry("default", digest) is not None, 10, "downloading entry")
    assert code(inference_pb2.InferRequest())[0] == grpc.StatusCode.FAILED_PRECONDITION
    peer.paused.clear()
    peer.wait_active(digest, timeout=30)

    bad_dtype = inference_pb2.InferRequest()
    bad_dtype.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))
    status, message = code(bad_dtype)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "complex64" in message

    short = inference_pb2.InferRequest()
    short.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=[1, 256], data=b"\0" * 8))
    status, message = code(short)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "1024 bytes" in message

    wrong_shape = inference_pb2.InferRequest()
    wrong_shape.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=[1, 3], data=b"\0" * 12))
    status, message = code(wrong_shape)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "[-1, 256]" in message

    assert output(infer(agent, np.zeros((1, 256), np.float32))).shape == (1, 64)


def test_publishing_on_another_devices_topic_is_refused(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    me, other = f"dev-{uuid.uuid4().hex[:8]}", f"dev-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    broker.add_user(me, password)
    inbox: queue.Queue[Any] = queue.Queue()
    link = Link(me, MqttConfig(port=broker.port, username=me, password=password), inbox, "test")
    link.start()
    try:
        assert link.wait_connected(10)
        with caplog.at_level(logging.ERROR, logger="agent.link"):
            refused = link.publish(str(Topic(other, Kind.TELEMETRY)), b"")
            assert refused.wait(10)
        assert (refused.ok, refused.reason) == (False, "Not authorized")
        assert any("Not authorized" in r.getMessage() and other in r.getMessage() for r in caplog.records)
        mine = link.publish(link.topic(Kind.TELEMETRY), b"")
        assert mine.wait(10) and mine.ok
    finally:
        link.stop()
