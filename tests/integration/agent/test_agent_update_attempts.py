"""An update that kills the agent while staging, on real agent processes restarted as systemd would.

Two ways to die: a SIGKILL right after ``stage`` was persisted (fault injection, at
every start), and a real one: a 217-byte ONNX model whose smoke inference fills
1.5 GiB, run by an agent in a memory cgroup of 768 MiB, so the kernel's OOM
killer ends it as it would on a device.

Each start finds the update persisted in ``stage`` and counts a crash; after
``[updates] max_attempts`` of them the update is failed with the reason, reported
with UPDATE_OUTCOME_FAILED, and the last committed model keeps serving: the agent
stays up instead of dying until systemd's StartLimitBurst stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import batch_hungry_model, linear_model, memory_hungry_model, write_model
from tests.support.waiting import wait_until

REASON = "crashed the agent 3 times while staging"
MEMORY_LIMIT = 768 << 20


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
    agent.readies = agent.output().count("agent ready")  # each crashed start was ready first
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


def _memory_group() -> tuple[Path, str, str, Path]:
    """A new memory cgroup: (folder, limit file, swap limit file, where its processes go back to)."""
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup for the agent needs root (CI runs the tests as root)")
    name = f"edgefleet-test-{uuid.uuid4().hex[:8]}"
    own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    v1 = Path("/sys/fs/cgroup/memory")
    if "memory" in own and (v1 / "memory.limit_in_bytes").exists():
        home = v1 / own["memory"].lstrip("/")
        return home / name, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", home
    v2 = Path("/sys/fs/cgroup")
    if "memory" in (v2 / "cgroup.subtree_control").read_text(errors="replace").split():
        return v2 / name, "memory.max", "memory.swap.max", v2 / own.get("", "/").lstrip("/")
    pytest.skip(
        "no cgroup memory controller to put the agent in (cgroup v1 memory, or v2 with memory enabled)"
    )


class MemoryLimit:
    """A cgroup limited to MEMORY_LIMIT bytes (no swap): the kernel OOM-kills what goes past it."""

    def __init__(self, group: Path) -> None:
        self.group = group

    def put(self, pid: int) -> None:
        (self.group / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        for name in ("memory.oom_control", "memory.events"):
            path = self.group / name
            if path.exists():
                counts = dict(line.split() for line in path.read_text().splitlines())
                return int(counts.get("oom_kill", 0))
        return 0


@pytest.fixture
def memory_limited() -> Iterator[MemoryLimit]:
    group, limit, swap_limit, home = _memory_group()
    try:
        group.mkdir()
        (group / limit).write_text(str(MEMORY_LIMIT))
        if (group / swap_limit).exists():
            (group / swap_limit).write_text(
                str(MEMORY_LIMIT) if swap_limit.startswith("memory.memsw") else "0"
            )
    except OSError as exc:
        pytest.skip(f"cannot set up a memory cgroup at {group}: {exc}")

    yield MemoryLimit(group)
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            (home / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


@pytest.mark.slow
def test_a_model_that_gets_the_agent_oom_killed_while_staging_is_failed_after_three_kills_and_v1_serves(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    memory_limited: MemoryLimit,
    tmp_path: Path,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    good, hungry = tmp_path / "good.onnx", tmp_path / "hungry.onnx"
    d1 = write_model(good, linear_model(81, 256, 64))
    d2 = write_model(hungry, memory_hungry_model(256, gib=1.5))
    peer.add_artifact(good)
    peer.add_artifact(hungry)

    def start() -> None:
        # As systemd's MemoryMax= would: the limit holds from the agent's first instruction.
        agent.start()
        assert agent.proc is not None
        memory_limited.put(agent.proc.pid)

    peer.publish_desired(1, peer.assignment(d1, "1"))
    start()
    agent.wait_ready()
    peer.wait_active(d1)

    peer.publish_desired(2, peer.assignment(d2, "2"))
    for crashes in range(3):
        assert agent.proc is not None
        agent.proc.wait(120)
        assert agent.proc.returncode == -9, f"not killed by the kernel:\n{agent.output()[-3000:]}"
        update = persisted(agent)["updates"]["default"]
        assert (update["state"], update["crashes"]) == ("stage", crashes)
        agent.readies = agent.output().count("agent ready")  # each crashed start was ready first
        start()
    assert memory_limited.oom_kills() == 3, "each death was the kernel's OOM killer"

    agent.wait_ready()
    wait_until(lambda: failed_with(peer, d2, REASON), 60, "the memory-hungry version reported failed")
    assert served_version(agent) == "1"
    time.sleep(2)
    assert agent.proc is not None and agent.proc.poll() is None, "the agent stays up"
    staged = re.findall(r"update state .* version=2 state=stage", agent.output())
    assert len(staged) == 3


def on_probation(peer: Peer, digest: str) -> fleet_pb2.ModelStatus | None:
    e = peer.entry("default", digest)
    return e if e is not None and e.update_state == "probation" else None


def rolled_back_with(peer: Peer, digest: str, reason: str) -> fleet_pb2.ModelStatus | None:
    e = peer.entry("default", digest)
    if e is None or (e.phase, e.outcome) != (
        fleet_pb2.MODEL_PHASE_FAILED,
        fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK,
    ):
        return None
    return e if e.error == f"rolled back: {reason}" else None


def attempt(peer: Peer, digest: str, generation: int) -> None:
    """Another rollout of version 2 (a newer generation, the same artifact), served on probation."""
    a = peer.assignment(digest, "2")
    a.rollout_id, a.probation_s = f"r-{generation}", 600.0
    peer.publish_desired(generation, a)


PROBATION_REASON = "crashed the agent 3 times while on probation"


def never_tried_again(agent: AgentProcess, peer: Peer, digest: str, reason: str, generation: int) -> None:
    """A newer rollout of the same artifact fails at once with the reason; nothing loads it again."""
    staged = len(re.findall(r"update state .* version=2 state=stage", agent.output()))
    attempt(peer, digest, generation)
    wait_until(
        lambda: (r := peer.last_reported()) is not None and r.desired_generation == generation,
        20,
        f"generation {generation}",
    )
    wait_until(
        lambda: ((e := peer.entry("default", digest)) is not None and e.error == reason) or None,
        20,
        "version 2 refused at once with the reason",
    )
    assert served_version(agent) == "1"
    assert len(re.findall(r"update state .* version=2 state=stage", agent.output())) == staged
    assert agent.proc is not None and agent.proc.poll() is None
    assert persisted(agent)["tenants"]["default"]["active"]["assignment"]["digest"] != digest


@pytest.mark.slow
@pytest.mark.parametrize("state", ["activate", "probation"])
def test_an_update_that_kills_the_agent_while_it_serves_counts_each_crash_and_is_failed_for_good_after_three(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    state: str,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    models = [tmp_path / f"m{i}.onnx" for i in (1, 2)]
    d1, d2 = (write_model(m, linear_model(90 + i, 256, 64)) for i, m in enumerate(models))
    for m in models:
        peer.add_artifact(m)
    peer.publish_desired(1, peer.assignment(d1, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)
    agent.terminate()

    # From now on the agent is SIGKILLed right after it persisted `state` for version 2, at every start.
    monkeypatch.setenv("EDGEFLEET_AGENT_KILL_AT", state)
    agent.start()
    agent.wait_ready()
    for generation, crashes in ((2, 1), (3, 2), (4, 3)):
        attempt(peer, d2, generation)
        assert agent.proc is not None
        agent.proc.wait(60)
        assert agent.proc.returncode == -9, agent.output()[-3000:]
        update = persisted(agent)["updates"]["default"]
        assert (update["state"], update["crashes"]) == (state, crashes - 1)
        agent.start()
        agent.wait_ready()
        reason = (
            PROBATION_REASON.replace("on probation", "activating")
            if state == "activate"
            else PROBATION_REASON
        )
        if crashes < 3:
            reason = f"the agent restarted during {state} (attempt {crashes} of 3)"
        wait_until(partial(rolled_back_with, peer, d2, reason), 30, f"crash {crashes} rolled back")
        assert served_version(agent) == "1"
        assert persisted(agent)["updates"]["default"]["crashes"] == crashes
    wait_until(
        lambda: any(e.kind == "update_outcome" and reason in e.message for e in peer.events),
        20,
        "update_outcome event with the reason",
    )
    never_tried_again(agent, peer, d2, reason, 5)


@pytest.mark.slow
def test_a_model_that_gets_the_agent_oom_killed_on_probation_is_rolled_back_and_failed_for_good_after_three(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    memory_limited: MemoryLimit,
    tmp_path: Path,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    good, hungry = tmp_path / "good.onnx", tmp_path / "hungry.onnx"
    d1 = write_model(good, linear_model(82, 256, 64))
    # Stages fine on one row; a batch of 256 rows wants 2 GiB.
    d2 = write_model(hungry, batch_hungry_model(256, mib_per_row=8))
    peer.add_artifact(good)
    peer.add_artifact(hungry)

    def start() -> None:
        agent.start()
        assert agent.proc is not None
        memory_limited.put(agent.proc.pid)

    peer.publish_desired(1, peer.assignment(d1, "1"))
    start()
    agent.wait_ready()
    peer.wait_active(d1)
    batch = np.ones((256, 256), np.float32)
    for generation, crashes in ((2, 1), (3, 2), (4, 3)):
        attempt(peer, d2, generation)
        wait_until(lambda: on_probation(peer, d2), 60, f"version 2 on probation, attempt {crashes}")
        req = inference_pb2.InferRequest()
        req.inputs["x"].CopyFrom(
            inference_pb2.Tensor(dtype="float32", shape=list(batch.shape), data=batch.tobytes())
        )
        with pytest.raises(grpc.RpcError):
            agent.stub().Infer(req, timeout=60)
        assert agent.proc is not None
        agent.proc.wait(60)
        assert agent.proc.returncode == -9, f"not killed by the kernel:\n{agent.output()[-3000:]}"
        start()
        agent.wait_ready()
        reason = (
            PROBATION_REASON
            if crashes == 3
            else f"the agent restarted during probation (attempt {crashes} of 3)"
        )
        wait_until(partial(rolled_back_with, peer, d2, reason), 60, f"OOM kill {crashes} rolled back")
        assert served_version(agent) == "1"
    assert memory_limited.oom_kills() == 3, "each death was the kernel's OOM killer"
    never_tried_again(agent, peer, d2, PROBATION_REASON, 5)
