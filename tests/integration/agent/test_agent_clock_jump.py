"""The device's clock jumps a day forward and a day back under a running agent.

The agent process runs with its wall clock shifted by a file the test rewrites
(:mod:`tests.support.clockshift`); its monotonic clock goes on, as a real jump leaves it. Through
both jumps: every telemetry window lasts what it lasted (never negative, never a day), the
windows are stamped by the device's clock as it is at their end, the agent keeps reporting,
and a probation begun on either side of a jump lasts its time: not skipped by the jump
forward, not held a day by the jump back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import REPO
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

DAY_S = 86_400
INTERVAL_S = 1.0
PROBATION_S = 8.0
# The test sees a probation begin only when the agent reports it, late on a busy machine; a
# probation read off the wall clock would end at once (forward) or last a day (back).
SHORTEST_PROBATION_S = PROBATION_S / 2
# A window may run late on a busy machine, never by anything near a day.
LONGEST_WINDOW_MS = 10_000


def start_on_shifted_clock(agent: AgentProcess, offset_file: Path) -> None:
    with open(agent.log_path, "ab") as log:
        agent.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.clockshift",
                str(offset_file),
                "run",
                "--config",
                str(agent.config),
            ],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def set_offset(offset_file: Path, seconds: float) -> None:
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(str(seconds))
    tmp.replace(offset_file)


def windows(peer: Peer) -> list[fleet_pb2.Telemetry]:
    """Each window once (a window is sent again until it is acknowledged), by sequence."""
    with peer.lock:
        by_seq = {t.seq: t for t in peer.telemetry}
    return [by_seq[s] for s in sorted(by_seq)]


def count_windows(peer: Peer) -> int:
    return len(windows(peer))


def probation_lasts(peer: Peer, digest: str, jump: Callable[[], None]) -> float:
    """Seconds from seeing ``digest`` on probation to seeing it active, ``jump`` made right after the first."""

    def on_probation() -> bool:
        e = peer.entry("default", digest)
        return e is not None and e.phase == fleet_pb2.MODEL_PHASE_PROBATION

    wait_until(on_probation, 30, f"{digest[:12]} on probation")
    began = time.monotonic()
    jump()
    peer.wait_active(digest, timeout=PROBATION_S + 30)
    return time.monotonic() - began


@pytest.mark.slow
def test_a_day_forward_and_back_keeps_windows_probation_and_reporting_sane(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent(telemetry_interval_s=INTERVAL_S)
    peer = make_peer(agent.device_id)
    digests = []
    for seed in (71, 72, 73):
        path = tmp_path / f"m{seed}.onnx"
        digests.append(write_model(path, linear_model(seed, 256, 64)))
        peer.add_artifact(path)
    d1, d2, d3 = digests
    offset_file = tmp_path / "clock-offset"
    set_offset(offset_file, 0)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    start_on_shifted_clock(agent, offset_file)
    agent.wait_ready()
    peer.wait_active(d1)
    wait_until(lambda: count_windows(peer) >= 3, 30, "windows before the jumps")

    # Forward a day while version 2 is on probation: the probation must not end at the jump.
    v2 = peer.assignment(d2, "2")
    v2.probation_s = PROBATION_S
    peer.publish_desired(2, v2)
    forward = probation_lasts(peer, d2, lambda: set_offset(offset_file, DAY_S))
    assert forward >= SHORTEST_PROBATION_S, f"probation skipped by the jump forward: {forward:.1f}s"
    ahead = count_windows(peer)
    wait_until(lambda: count_windows(peer) >= ahead + 3, 30, "windows on the clock a day ahead")

    # Back a day while version 3 is on probation: it must end in its time, not a day later.
    v3 = peer.assignment(d3, "3")
    v3.probation_s = PROBATION_S
    peer.publish_desired(3, v3)
    back = probation_lasts(peer, d3, lambda: set_offset(offset_file, 0))
    assert back >= SHORTEST_PROBATION_S, f"probation ended early after the jump back: {back:.1f}s"
    behind = count_windows(peer)
    wait_until(lambda: count_windows(peer) >= behind + 3, 30, "windows on the clock set back")

    seen = windows(peer)
    seqs = [w.seq for w in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"a window is missing: {seqs}"
    lengths = [w.window_end_ms - w.window_start_ms for w in seen]
    assert all(0 <= n <= LONGEST_WINDOW_MS for n in lengths), f"window lengths (ms): {lengths}"
    # Stamped by the device's clock: a day ahead while it was ahead, back in step after.
    real_now_ms = time.time() * 1000
    assert any(w.window_end_ms > real_now_ms + (DAY_S - 600) * 1000 for w in seen[ahead:behind])
    assert all(abs(w.window_end_ms - real_now_ms) < 600_000 for w in seen[-2:])
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.terminate() == 0
