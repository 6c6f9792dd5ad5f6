"""The telemetry outbox on a real full disk (a small tmpfs filled to the last byte).

What must hold: no write kills the agent; the oldest telemetry makes room for the
newest and what does not fit is counted; the counts travel in the telemetry; the
model keeps serving; storing resumes by itself once space is freed.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from agent.outbox import RESERVE_BYTES, Outbox
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.disks import KeepFull, fill, small_tmpfs
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until


def window(seq: int) -> bytes:
    return os.urandom(2000) + seq.to_bytes(8, "big")


def stored_seqs(box: Outbox) -> list[int]:
    return [r.seq for r in box.oldest(1_000_000) if r.seq is not None]


def test_the_oldest_telemetry_makes_room_for_the_newest_and_storing_resumes_when_space_returns(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "disk", 6) as disk:
        box = Outbox(disk / "outbox.db", max_records=1_000_000)
        assert box.reserve.stat().st_size == RESERVE_BYTES
        for seq in range(1, 201):
            box.append("telemetry", window(seq), seq, seq=seq)
        filler = fill(disk)

        for seq in range(201, 1001):
            box.append("telemetry", window(seq), seq, seq=seq)
        seqs = stored_seqs(box)
        assert seqs == sorted(seqs) and seqs[0] > 1, "the oldest windows went first"
        assert seqs[-1] == 1000, "the newest window is stored"
        assert box.dropped_for_space() >= 200
        assert not box.reserve.exists(), "the reserve was given to the full disk"

        # A record larger than all there is to drop cannot be stored: counted, not raised.
        box.append("capture", os.urandom(8 * 1024 * 1024), 0)
        assert box.unwritable == 1

        filler.unlink()
        for seq in range(1001, 1101):
            box.append("telemetry", window(seq), seq, seq=seq)
        assert box.unwritable == 1
        assert stored_seqs(box)[-100:] == list(range(1001, 1101))
        assert box.reserve.stat().st_size == RESERVE_BYTES, "the reserve is kept again"
        box.close()


def queued_windows(agent: AgentProcess) -> int:
    db = sqlite3.connect(agent.data_dir / "outbox.db")
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'telemetry'").fetchone()
        return int(count)
    finally:
        db.close()


def disk_full(peer: Peer) -> fleet_pb2.DeviceCondition | None:
    reported = peer.last_reported()
    if reported is None:
        return None
    return next((c for c in reported.conditions if c.kind == "disk_full"), None)


def served(agent: AgentProcess) -> bool:
    x = np.ones((1, 256), np.float32)
    req = inference_pb2.InferRequest()
    req.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return resp.model_version == "1"


@pytest.mark.slow
def test_an_agent_whose_disk_fills_keeps_serving_and_reports_the_telemetry_it_could_not_keep(
    broker: Broker,
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
) -> None:
    agent = make_agent(telemetry_interval_s=0.1)
    with open(agent.config, "a") as config:
        # Downloads keep 1 MiB free for the agent's own small writes (the default is larger than this disk).
        config.write("[updates]\nreserve_mb = 1.0\n")
    with small_tmpfs(agent.data_dir, 12):
        peer = make_peer(agent.device_id)
        model = tmp_path / "m1.onnx"
        digest = write_model(model, linear_model(71, 256, 64))
        peer.add_artifact(model)
        peer.publish_desired(1, peer.assignment(digest, "1"))
        agent.start()
        agent.wait_ready()
        peer.wait_active(digest)

        # The controller is out of reach, so windows pile up in the outbox, and the disk fills.
        broker.stop()
        wait_until(lambda: queued_windows(agent) >= 30, 30, "windows queued while the controller is away")
        with KeepFull(agent.data_dir):
            wait_until(lambda: "oldest records dropped" in agent.output(), 60, "the oldest telemetry dropped")
            assert served(agent), "the model keeps serving on a full disk"
            # A restart on the disk without a free byte comes up and serves; its outbox
            # may not even open, and counts what it cannot store.
            assert agent.terminate() == 0
            agent.start()
            agent.wait_ready()
            assert served(agent)
            broker.start()
            condition = wait_until(lambda: disk_full(peer), 30, "the disk_full condition reported")
            assert "telemetry outbox" in condition.message
            assert agent.proc is not None and agent.proc.poll() is None

        wait_until(lambda: (agent.data_dir / "outbox.db.reserve").exists(), 30, "the reserve written again")
        wait_until(lambda: peer.last_reported() and not disk_full(peer), 60, "the condition cleared")
        counted = wait_until(
            lambda: [
                t for t in list(peer.telemetry) if t.outbox_dropped_for_space > 0 and t.outbox_unwritable > 0
            ],
            60,
            "telemetry counting the windows dropped for space and those not stored",
        )
        last = max(t.seq for t in list(peer.telemetry))
        later = wait_until(
            lambda: [t for t in list(peer.telemetry) if t.seq > last + 5], 30, "windows after space returned"
        )
        assert all(t.outbox_unwritable == later[0].outbox_unwritable for t in later), "no new losses"
        assert later[0].outbox_dropped_for_space >= counted[0].outbox_dropped_for_space
        assert agent.proc is not None and agent.proc.poll() is None
        assert served(agent)
        assert agent.terminate() == 0
    assert "Traceback" not in agent.output()
