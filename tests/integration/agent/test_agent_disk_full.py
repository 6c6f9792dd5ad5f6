"""A full data disk during an update, on a real agent process whose data folder is a small tmpfs.

The disk is filled to the last byte (as another program on the device, or the
download itself, would). What must hold: the agent stays up and keeps serving the
model it has, the ``disk_full`` condition is reported with the device's state, a
restart on the full disk comes up too, and once space is freed the pending update
completes by itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.disks import fill, small_tmpfs
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

DISK_MB = 12
CHUNK = 64 * 1024


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path], Path]]:
    """Mount a DISK_MB tmpfs over a folder (the agent's data folder) for the test's duration."""
    with contextlib.ExitStack() as mounts:
        yield lambda path: mounts.enter_context(small_tmpfs(path, DISK_MB))


def served_version(agent: AgentProcess) -> str:
    x = np.ones((1, 256), np.float32)
    req = inference_pb2.InferRequest()
    req.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(x.shape), data=x.tobytes()))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return str(resp.model_version)


def said(peer: Peer, what: str) -> fleet_pb2.DeviceCondition | None:
    """A disk_full condition whose message says ``what``, in any report so far."""
    with peer.lock:
        reports = list(peer.reported)
    conditions = (c for r in reports for c in r.conditions if c.kind == "disk_full")
    return next((c for c in conditions if what in c.message), None)


def disk_full(peer: Peer) -> fleet_pb2.DeviceCondition | None:
    reported = peer.last_reported()
    if reported is None:
        return None
    return next((c for c in reported.conditions if c.kind == "disk_full"), None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "filled", ["before_the_download", "leaving_too_little_for_it", "during_the_download"]
)
def test_a_full_disk_pauses_the_update_while_the_old_model_serves_and_it_completes_once_space_is_freed(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    small_disk: Callable[[Path], Path],
    tmp_path: Path,
    filled: str,
) -> None:
    # Telemetry windows keep coming too: their outbox shares the full disk.
    agent = make_agent(telemetry_interval_s=1.0)
    with open(agent.config, "a") as config:
        config.write("[updates]\nreserve_mb = 1.0\n")
    small_disk(agent.data_dir)
    peer = make_peer(agent.device_id)
    peer.chunk_size = CHUNK
    m1, m2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    d1 = write_model(m1, linear_model(71, 256, 64))
    d2 = write_model(m2, linear_model(72, 256, 4096))  # 4 MiB: a third of the disk
    peer.add_artifact(m1)
    peer.add_artifact(m2)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)

    if filled == "before_the_download":
        fillers = [fill(agent.data_dir)]
        peer.publish_desired(2, peer.assignment(d2, "2"))
        what = "writing state.json: No space left on device"  # not even the new desired state
    elif filled == "leaving_too_little_for_it":
        fillers = [fill(agent.data_dir)]
        os.truncate(
            fillers[0], fillers[0].stat().st_size - (3 << 20)
        )  # 3 MiB free: less than 4 MiB + 1 MiB kept
        peer.publish_desired(2, peer.assignment(d2, "2"))
        what = f"artifact {d2[:12]} of {m2.stat().st_size} bytes does not fit"
    else:
        peer.serve_limit = peer.chunks_sent + 5
        peer.publish_desired(2, peer.assignment(d2, "2"))
        wait_until(
            lambda: (e := peer.entry("default", d2)) is not None and e.bytes_have == 5 * CHUNK,
            30,
            "5 chunks on disk",
        )
        fillers = [fill(agent.data_dir)]
        # Whatever frees a little space when the disk fills (the telemetry outbox gives up its
        # reserve file) is taken too: the disk stays full.
        wait_until(lambda: disk_full(peer), 30, "disk_full reported")
        fillers.append(fill(agent.data_dir))
        peer.serve_limit = None
        what = ""  # whichever write hit it first: the telemetry outbox's, or the update's state

    # The message is the latest refused write's: the update's, or the telemetry outbox's.
    condition = wait_until(lambda: said(peer, what), 30, f"disk_full reported: {what}")
    assert condition.since_ms > 0 and condition.count >= 1
    reported = peer.last_reported()
    assert reported is not None and reported.desired_generation == 2
    pending = peer.entry("default", d2)
    assert pending is not None and pending.phase != fleet_pb2.MODEL_PHASE_FAILED, pending
    if filled == "during_the_download":
        # The download took its whole size when it started: it finishes on the full disk, and
        # only what comes after it (writing the update's state) waits for space.
        wait_until(
            lambda: (
                (e := peer.entry("default", d2)) is not None and e.phase == fleet_pb2.MODEL_PHASE_VERIFYING
            ),
            30,
            "the download finished into the space it had",
        )
    assert served_version(agent) == "1"

    # A restart on the full disk comes up, serves, and reports the condition again.
    agent.kill()
    restarted_ms = int(time.time() * 1000)
    agent.start()
    agent.wait_ready()

    def reported_again() -> fleet_pb2.DeviceCondition | None:
        r = peer.last_reported()
        return disk_full(peer) if r is not None and r.reported_at_ms >= restarted_ms else None

    wait_until(reported_again, 30, "disk_full reported after the restart")
    assert served_version(agent) == "1"
    assert agent.proc is not None and agent.proc.poll() is None

    for filler in fillers:
        filler.unlink()
    peer.wait_active(d2, timeout=90)
    wait_until(lambda: (r := peer.last_reported()) is not None and not r.conditions, 30, "condition cleared")
    assert served_version(agent) == "2"
    assert "disk space back" in agent.output()
