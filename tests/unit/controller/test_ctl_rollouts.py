"""The rollout service over a real SQLite file: plans stored, engine passes, commands, resume."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as

from controller.errors import (
    CommandRefused,
    InvalidInputError,
    RolloutConflict,
    RolloutNotFound,
    UnknownTargets,
)
from controller.rollout_engine import Command, State
from controller.rollout_executor import decode_desired, device_status, load_run
from controller.rollout_plans import FailureAction, Gates, Plan, ShadowGate, Target, Wave
from controller.rollouts import Rollouts, rollout_status
from tests.support.model_files import add_model
from tests.unit.controller.helpers import Parts, reported, state

pytestmark = pytest.mark.both_backends


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.sent.append((device_id, payload))

    def generations(self) -> list[tuple[str, int]]:
        return [(d, decode_as(fleet_pb2.DesiredState, p).generation) for d, p in self.sent]


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.registry.upload("adder", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    p.registry.upload("adder", "2", io.BytesIO(add_model(tmp_path / "b.onnx", ["batch", 8]).read_bytes()), {})
    for i in range(1, 7):
        p.fleet.register(f"dev-{i}", ["lab"] if i <= 4 else [])
    return p


@pytest.fixture
def clock(parts: Parts) -> Clock:
    c = Clock()
    parts.rollouts.clock = c
    return c


def report(parts: Parts, device_id: str, digest: str, phase: int, at: float, error: str = "") -> None:
    msg = fleet_pb2.ReportedState(device_id=device_id, reported_at_ms=int(at * 1000))
    msg.models.add(tenant="default", artifact_digest=digest, phase=phase, error=error)
    parts.fleet.record_reported(device_id, msg, received_at=at)


def telemetry(
    parts: Parts, device_id: str, version: str, at: float, count: int, errors: int, p95: float
) -> None:
    msg = fleet_pb2.Telemetry(device_id=device_id, seq=int(at * 10), window_start_ms=int(at * 1000))
    msg.models.add(
        tenant="default",
        model_name="adder",
        model_version=version,
        inference_count=count,
        error_count=errors,
        latency_p95_ms=p95,
    )
    parts.telemetry.ingest_telemetry(device_id, msg, received_at=at)


STAGED = Plan(
    Target(tags=("lab",)),
    waves=(Wave(count=1, soak_s=10), Wave(percent=100, soak_s=10)),
    gates=Gates(max_error_rate=0.05, max_latency_ratio=3.0, min_inferences=10),
    failure_action=FailureAction.ROLLBACK,
    device_timeout_s=60,
)


def test_create_persists_and_publishes_desired_states(parts: Parts) -> None:
    published = Published()
    parts.rollouts.publisher = published
    rollout = parts.rollouts.create("adder", "1", ["dev-1", "dev-2", "dev-1"])
    assert (rollout.status, rollout.state, rollout.wave, rollout.waves) == ("in_progress", "running", 1, 1)
    assert [(d.device_id, d.status) for d in rollout.devices] == [("dev-1", "pending"), ("dev-2", "pending")]
    assert published.generations() == [("dev-1", 1), ("dev-2", 1)]
    desired = decode_as(fleet_pb2.DesiredState, published.sent[0][1])
    assert desired.models[0].rollout_id == rollout.id
    assert parts.fleet.desired_states()[0] == published.sent[0]
    # A plain rollout supersedes a plain one on the same device.
    second = parts.rollouts.create("adder", "1", ["dev-1"])
    assert parts.fleet.get("dev-1").desired_generation == 2
    first = parts.rollouts.get(rollout.id)
    assert first.state == "superseded"
    assert "superseded by rollout " + second.id in first.devices[0].detail
    assert [r.id for r in parts.rollouts.all()] == [second.id, rollout.id]
    assert [e.kind for e in parts.rollouts.events(rollout.id)] == [
        "created",
        "start_wave",
        "set_desired",
        "set_desired",
        "superseded",
    ]


def test_status_follows_reported_state(parts: Parts) -> None:
    rollout = parts.rollouts.create("adder", "1", ["dev-1", "dev-2"])
    for device_id in ("dev-1", "dev-2"):
        report(parts, device_id, rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 123.0)
    parts.rollouts.advance(rollout.id)
    done = parts.rollouts.get(rollout.id)
    assert (done.status, done.state) == ("succeeded", "succeeded")
    assert {(d.status, d.updated_at) for d in done.devices} == {("active", 123.0)}


def test_a_staged_plan_refuses_to_share_a_device_and_tenant(parts: Parts) -> None:
    staged = parts.rollouts.create("adder", "2", plan_=STAGED)
    with pytest.raises(RolloutConflict, match=f"dev-1 .*already in active rollout {staged.id} \\(running\\)"):
        parts.rollouts.create("adder", "1", ["dev-1", "dev-5"])
    with pytest.raises(RolloutConflict):
        parts.rollouts.create("adder", "1", plan_=STAGED)
    assert [r.id for r in parts.rollouts.all()] == [staged.id]
    # Another tenant on the same device is free, and so is a device outside the target.
    parts.rollouts.create("adder", "1", ["dev-1"], tenant="audio")
    parts.rollouts.create("adder", "1", ["dev-5"])
    parts.rollouts.command(staged.id, Command.ABORT)
    parts.rollouts.create("adder", "1", ["dev-1"])


def test_waves_advance_after_soak_and_the_engine_resumes_after_a_restart(parts: Parts, clock: Clock) -> None:
    published = Published()
    parts.rollouts.publisher = published
    r = parts.rollouts.create("adder", "2", plan_=STAGED)
    assert [(d.device_id, d.status, d.wave) for d in r.devices][:2] == [
        ("dev-1", "pending", 1),
        ("dev-2", "waiting", 2),
    ]
    assert published.generations() == [("dev-1", 1)]
    report(parts, "dev-1", r.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now + 1)
    # Inferences of the new version for its gates to judge: without them the wave would not pass.
    telemetry(parts, "dev-1", "2", clock.now + 1, 100, 0, 1.0)
    clock.now += 2
    parts.rollouts.advance(r.id)
    clock.now += 5
    assert parts.rollouts.advance(r.id) == clock.now + 5  # soaking until then

    # The controller restarts: a new service over the same database carries on.
    again = Rollouts(parts.store, parts.registry, parts.fleet, clock)
    again.publisher = published
    again.advance(r.id)
    assert published.generations() == [("dev-1", 1)]
    clock.now += 6
    again.advance(r.id)
    assert published.generations() == [("dev-1", 1), ("dev-2", 1), ("dev-3", 1), ("dev-4", 1)]
    again.advance(r.id)
    parts.rollouts.advance(r.id)
    assert len(published.sent) == 4, "nothing sent twice"
    kinds = [(e.kind, e.device_id) for e in again.events(r.id) if e.kind == "set_desired"]
    assert len(kinds) == len(set(kinds)) == 4


def test_a_slow_version_is_rolled_back_on_every_touched_device(parts: Parts, clock: Clock) -> None:
    parts.rollouts.create("adder", "1", ["dev-1", "dev-2", "dev-3", "dev-4"])
    t0 = clock.now
    for d in ("dev-1", "dev-2"):
        telemetry(parts, d, "1", t0, 100, 0, 2.0)
    clock.now += 10
    plan = Plan(
        Target(tags=("lab",)),
        waves=(Wave(count=2, soak_s=30), Wave(percent=100)),
        gates=Gates(max_latency_ratio=3.0, min_inferences=10),
        failure_action=FailureAction.ROLLBACK,
    )
    with pytest.raises(RolloutConflict):
        parts.rollouts.create("adder", "2", plan_=plan)
    for d in ("dev-1", "dev-2", "dev-3", "dev-4"):
        report(parts, d, parts.registry.find("adder", "1").digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)  # type: ignore[union-attr]
    parts.rollouts.advance(parts.rollouts.all()[0].id)
    r = parts.rollouts.create("adder", "2", plan_=plan)
    clock.now += 1
    for d in ("dev-1", "dev-2"):
        report(parts, d, r.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)
        telemetry(parts, d, "2", clock.now, 100, 0, 11.0)
    parts.rollouts.advance(r.id)
    done = parts.rollouts.get(r.id)
    assert (done.state, done.status) == ("rolled_back", "failed")
    assert "p95 latency 5.50x the previous version" in done.reason
    assert [d.status for d in done.devices] == ["rolled_back", "rolled_back", "waiting", "waiting"]
    for d in ("dev-1", "dev-2"):
        desired = decode_as(fleet_pb2.DesiredState, dict(parts.fleet.desired_states())[d])
        assert desired.models[0].model_version == "1"
    assert [e.kind for e in parts.rollouts.events(r.id)][-3:] == [
        "revert_desired",
        "revert_desired",
        "complete",
    ]
    roll_back = next(e for e in parts.rollouts.events(r.id) if e.kind == "roll_back")
    assert "wave 1 of 2: p95 latency" in roll_back.reason


def test_operator_commands_follow_the_table(parts: Parts, clock: Clock) -> None:
    r = parts.rollouts.create("adder", "2", plan_=STAGED)
    assert parts.rollouts.command(r.id, Command.PAUSE, "looks odd").state == "paused"
    with pytest.raises(CommandRefused, match=r"cannot approve rollout .*: it is paused"):
        parts.rollouts.command(r.id, Command.APPROVE)
    assert parts.rollouts.command(r.id, Command.RESUME).state == "running"
    report(parts, "dev-1", r.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)
    parts.rollouts.advance(r.id)
    promoted = parts.rollouts.command(r.id, Command.PROMOTE)
    assert (promoted.state, promoted.wave) == ("running", 2)
    assert parts.rollouts.command(r.id, Command.ROLLBACK).state == "rolled_back"
    events = parts.rollouts.events(r.id)
    assert ("pause", "operator: looks odd") in [(e.kind, e.reason) for e in events]
    assert [e.kind for e in events if e.kind in ("promote", "rollback", "complete")] == [
        "promote",
        "rollback",
        "complete",
    ]
    with pytest.raises(RolloutNotFound):
        parts.rollouts.command("nope", Command.PAUSE)


def test_bad_rollouts_name_the_problem_and_change_nothing(parts: Parts) -> None:
    with pytest.raises(UnknownTargets, match="unknown devices: ghost, ghoul"):
        parts.rollouts.create("adder", "1", ["dev-1", "ghost", "ghoul"])
    with pytest.raises(UnknownTargets, match="unknown model version adder 9"):
        parts.rollouts.create("adder", "9", ["dev-1"])
    with pytest.raises(InvalidInputError, match="at least one device"):
        parts.rollouts.create("adder", "1", [])
    with pytest.raises(InvalidInputError, match="tenant"):
        parts.rollouts.create("adder", "1", ["dev-1"], tenant="a/b")
    with pytest.raises(InvalidInputError, match="matches no registered device: tags nowhere"):
        parts.rollouts.create("adder", "1", plan_=Plan(Target(tags=("nowhere",))))
    assert parts.rollouts.all() == []
    assert parts.fleet.desired_states() == []
    with pytest.raises(RolloutNotFound):
        parts.rollouts.get("nope")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ((), ("pending", "the device has not picked up this version yet")),
        ((state("d" * 64, "downloading", have=10, total=40),), ("downloading", "10/40 bytes")),
        ((state("d" * 64, "probation"),), ("probation", "")),
        ((state("c" * 64, "active"), state("d" * 64, "active")), ("active", "")),
        ((state("d" * 64, "failed", error="digest mismatch"),), ("failed", "digest mismatch")),
        ((state("d" * 64, "failed"),), ("failed", "the device reported a failure without a reason")),
        (
            (state("d" * 64, "active", tenant="audio"),),
            ("pending", "the device has not picked up this version yet"),
        ),
        ((state("d" * 64, "unspecified"),), ("pending", "reported phase unspecified")),
    ],
)
def test_device_status_matches_by_tenant_and_digest(models: tuple, expected: tuple[str, str]) -> None:  # type: ignore[type-arg]
    assert device_status("default", "d" * 64, reported(*models)) == expected


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["active", "active"], "succeeded"),
        (["active", "failed"], "failed"),
        (["active", "downloading"], "in_progress"),
        ([], "in_progress"),
    ],
)
def test_rollout_status(statuses: list, expected: str) -> None:  # type: ignore[type-arg]
    assert rollout_status(statuses) == expected


def test_confidence_gate_reads_the_drift_sketches_devices_send(parts: Parts, clock: Clock) -> None:
    from controller.baselines import Baselines
    from controller.rollout_executor import mean_confidence

    sketches = Baselines(parts.store, 60)

    def sketch(device_id: str, version: str, counts: list[int], at: float) -> None:
        msg = fleet_pb2.Telemetry(device_id=device_id, seq=int(at), window_start_ms=int(at * 1000))
        sk = msg.drift.add(tenant="default", model_name="adder", model_version=version, samples=sum(counts))
        sk.confidence.edges[:] = [0.5]
        sk.confidence.counts[:] = counts
        sk.class_counts[:] = counts
        sketches.observe(device_id, msg, at)

    assert mean_confidence(fleet_pb2.Histogram(edges=[0.5], counts=[1, 3])) == (4, 0.625)
    first = parts.rollouts.create("adder", "1", ["dev-1", "dev-2"])
    for d in ("dev-1", "dev-2"):
        report(parts, d, first.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)
        sketch(d, "1", [0, 40], clock.now)
    parts.rollouts.advance(first.id)
    clock.now += 10
    plan = Plan(
        Target(devices=("dev-1", "dev-2")),
        waves=(Wave(count=1, soak_s=30), Wave(percent=100)),
        gates=Gates(min_confidence_ratio=0.8, min_inferences=10),
        failure_action=FailureAction.ROLLBACK,
    )
    r = parts.rollouts.create("adder", "2", plan_=plan)
    clock.now += 1
    report(parts, "dev-1", r.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)
    sketch("dev-1", "2", [30, 10], clock.now)
    parts.rollouts.advance(r.id)
    done = parts.rollouts.get(r.id)
    assert done.state == "rolled_back"
    assert "mean confidence 0.375 is 0.50x the previous version's 0.750" in done.reason
    # The same sketches also carry the predicted classes: the PSI gate reads them.
    from controller.rollout_executor import snapshot

    run = load_run(parts.store, r.id)
    assert run is not None
    views = snapshot(parts.store, replace(run, state=State.RUNNING, wave=0), clock.now)
    assert (views["dev-1"].new.classes, views["dev-1"].baseline.classes) == ((30, 10), (0, 40))


def shadow_window(parts: Parts, device_id: str, at: float, compared: int, agreement: float) -> None:
    msg = fleet_pb2.Telemetry(device_id=device_id, seq=int(at * 10), window_start_ms=int(at * 1000))
    msg.shadows.add(
        tenant="default",
        live_model_version="1",
        candidate_model_name="adder",
        candidate_model_version="2",
        compared=compared,
        top1_agreement=agreement,
    )
    parts.telemetry.ingest_telemetry(device_id, msg, received_at=at)


def report_shadow(parts: Parts, device_id: str, live: str, candidate: str | None, at: float) -> None:
    msg = fleet_pb2.ReportedState(device_id=device_id, reported_at_ms=int(at * 1000))
    msg.models.add(tenant="default", artifact_digest=live, phase=fleet_pb2.MODEL_PHASE_ACTIVE)
    if candidate is not None:
        msg.models.add(tenant="default.shadow", artifact_digest=candidate, phase=fleet_pb2.MODEL_PHASE_ACTIVE)
    parts.fleet.record_reported(device_id, msg, received_at=at)


def desired_models(parts: Parts, device_id: str) -> list[tuple[str, str]]:
    row = parts.store.query_one("SELECT desired FROM devices WHERE device_id = ?", (device_id,))
    desired = decode_desired(row["desired"]) if row else None
    return [(m.tenant, m.model_version) for m in desired.models] if desired else []


SHADOWED = replace(
    STAGED,
    target=Target(devices=("dev-1", "dev-2")),
    gates=Gates(),
    shadow=ShadowGate(soak_s=10, min_agreement=0.9, min_compared=50),
)


@pytest.mark.parametrize(("agreement", "state"), [(0.4, "rolled_back"), (0.97, "running")])
def test_shadow_phase_reads_the_stored_shadow_stats_and_gates_going_live(
    parts: Parts, clock: Clock, agreement: float, state: str
) -> None:
    first = parts.rollouts.create("adder", "1", ["dev-1", "dev-2"])
    for d in ("dev-1", "dev-2"):
        report(parts, d, first.digest, fleet_pb2.MODEL_PHASE_ACTIVE, clock.now)
    parts.rollouts.advance(first.id)
    r = parts.rollouts.create("adder", "2", plan_=SHADOWED)
    assert desired_models(parts, "dev-1") == [("default", "1"), ("default.shadow", "2")]
    assert [d.status for d in parts.rollouts.get(r.id).devices] == ["shadow", "waiting"]
    # Another rollout may not take the shadow slot the plan uses.
    with pytest.raises(RolloutConflict):
        parts.rollouts.create("adder", "2", ["dev-1"], tenant="default.shadow")

    clock.now += 1
    report_shadow(parts, "dev-1", first.digest, r.digest, clock.now)
    parts.rollouts.advance(r.id)
    clock.now += 11
    shadow_window(parts, "dev-1", clock.now - 5, 30, agreement)
    shadow_window(parts, "dev-1", clock.now - 4, 30, agreement)
    # A window from before the shadow was set does not count.
    shadow_window(parts, "dev-1", clock.now - 100, 1000, 1.0 - agreement)
    parts.rollouts.advance(r.id)
    done = parts.rollouts.get(r.id)
    assert done.state == state, done
    kinds = [e.kind for e in parts.rollouts.events(r.id)]
    models = desired_models(parts, "dev-1")
    if state == "rolled_back":
        assert done.reason.startswith("wave 1 of 2: shadow gate: top-1 agreement with the live model 0.400")
        assert kinds[-3:] == ["roll_back", "revert_desired", "complete"]
        assert models == [("default", "1")]
        assert (done.devices[0].status, done.devices[0].detail) == (
            "rolled_back",
            "shadow candidate cleared; it never went live",
        )
    else:
        assert "go_live" in kinds and kinds[-1] == "set_desired"
        assert models == [("default", "2")]


def test_a_shadow_phase_needs_a_live_tenant(parts: Parts) -> None:
    with pytest.raises(InvalidInputError, match="is itself a shadow slot"):
        parts.rollouts.create("adder", "2", tenant="default.shadow", plan_=SHADOWED)
