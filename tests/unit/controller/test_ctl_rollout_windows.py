"""Rollouts to groups, waves that wait for maintenance windows, scheduled starts and retrying
only the failed devices: the pure engine, then the service over a real SQLite file with a
clock the test moves."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as

from controller.errors import CommandRefused, InvalidInputError, UnknownTargets
from controller.groups import Query
from controller.maintenance import ALWAYS, WindowStatus
from controller.rollout_engine import (
    DeviceView,
    Member,
    Phase,
    Run,
    SetDesired,
    StartWave,
    State,
    Wait,
    plan,
)
from controller.rollout_plans import Plan, ShadowGate, Target, Wave
from tests.support.models import small_conv
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

NOW = 1_800_000_000.0
OLD = fleet_pb2.ModelAssignment(tenant="default", model_name="m", model_version="1", artifact_digest="a" * 64)
NEW = fleet_pb2.ModelAssignment(
    tenant="default", model_name="m", model_version="2", artifact_digest="b" * 64, rollout_id="r"
)
CLOSED = WindowStatus(False, NOW + 3600, "waiting for maintenance window (next opens 2027-01-15T09:00+01:00)")


def view(device_id: str, window: WindowStatus = ALWAYS, status: str = "pending") -> DeviceView:
    desired = fleet_pb2.DesiredState(device_id=device_id, generation=3, models=[OLD])
    return DeviceView(device_id, True, 3, desired, status, window=window)  # type: ignore[arg-type]


def wave_run(*members: Member, p: Plan | None = None, wave: int = 0) -> Run:
    return Run("r", "default", p or Plan(Target(all_devices=True)), State.RUNNING, members, wave=wave)


def test_the_engine_sends_only_devices_inside_their_window_and_waits_until_the_next_opening() -> None:
    r = wave_run(Member("a", 0, NEW, OLD), Member("b", 0, NEW, OLD))
    steps = plan(r, {"a": view("a"), "b": view("b", CLOSED)}, NOW)
    assert [(type(s), getattr(s, "device_id", "")) for s in steps] == [(SetDesired, "a")]
    r = wave_run(Member("a", 0, NEW, OLD, set_at=NOW), Member("b", 0, NEW, OLD))
    steps = plan(r, {"a": view("a", status="active"), "b": view("b", CLOSED)}, NOW + 1)
    assert len(steps) == 1 and isinstance(steps[0], Wait)
    assert steps[0].until == NOW + 3600
    assert steps[0].reason == "wave 1 of 1: devices updating; 1 waiting for their maintenance window"
    steps = plan(r, {"a": view("a", status="active"), "b": view("b")}, NOW + 3600)
    assert [getattr(s, "device_id", "") for s in steps] == ["b"]


def test_a_shadow_candidate_also_waits_for_the_window_but_a_rollback_does_not() -> None:
    p = Plan(Target(all_devices=True), shadow=ShadowGate(soak_s=10))
    r = Run("r", "default", p, State.RUNNING, (Member("a", 0, NEW, OLD),), wave=0, phase=Phase.SHADOW)
    steps = plan(r, {"a": view("a", CLOSED)}, NOW)
    assert len(steps) == 1 and isinstance(steps[0], Wait) and steps[0].until == NOW + 3600
    carrying = view("a", CLOSED)
    carrying.desired.models[0].CopyFrom(NEW)  # type: ignore[union-attr]
    back = Run("r", "default", p, State.ROLLING_BACK, (Member("a", 0, NEW, OLD, set_at=NOW),), wave=0)
    steps = plan(back, {"a": carrying}, NOW)
    assert len(steps) == 1 and isinstance(steps[0], SetDesired) and steps[0].revert


def test_a_scheduled_rollout_waits_for_its_start_time_then_starts_its_first_wave() -> None:
    p = Plan(Target(all_devices=True), start_at=NOW + 60)
    r = Run("r", "default", p, State.RUNNING, (Member("a", 0, NEW, OLD),))
    steps = plan(r, {"a": view("a")}, NOW)
    assert len(steps) == 1 and isinstance(steps[0], Wait)
    assert (steps[0].until, steps[0].reason) == (NOW + 60, "scheduled to start at 2027-01-15T08:01:00+00:00")
    assert isinstance(plan(r, {"a": view("a")}, NOW + 60)[0], StartWave)


# -- the service --------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.sent.append((device_id, decode_as(fleet_pb2.DesiredState, payload).generation))


PARIS = ZoneInfo("Europe/Paris")
# Monday 7 December 2026, 14:30 in Paris: outside a nightly 02:00-04:00 window.
AFTERNOON = datetime(2026, 12, 7, 14, 30, tzinfo=PARIS).timestamp()
NIGHT = datetime(2026, 12, 8, 2, 0, tzinfo=PARIS).timestamp()


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.registry.upload("conv", "1", io.BytesIO(small_conv(tmp_path / "c.onnx").read_bytes()), {})
    for i, tags in enumerate((["site-a"], ["site-a"], ["site-b"], ["site-a"]), 1):
        p.fleet.register(f"cam-{i}", tags)
    p.rollouts.clock = Clock(AFTERNOON)
    p.rollouts.publisher = Published()  # type: ignore[assignment]
    return p


def clock(parts: Parts) -> Clock:
    c = parts.rollouts.clock
    assert isinstance(c, Clock)
    return c


def sent(parts: Parts) -> list[tuple[str, int]]:
    published = parts.rollouts.publisher
    assert isinstance(published, Published)
    return published.sent


def report(parts: Parts, device_id: str, digest: str, phase: int, generation: int, error: str = "") -> None:
    msg = fleet_pb2.ReportedState(device_id=device_id, desired_generation=generation, reported_at_ms=1)
    msg.models.add(tenant="default", artifact_digest=digest, phase=phase, error=error)
    parts.fleet.record_reported(device_id, msg, received_at=clock(parts).now)


def test_a_rollout_to_a_group_targets_its_members_and_refuses_unknown_or_empty_groups(parts: Parts) -> None:
    groups = parts.rollouts.groups
    groups.create("site-a", query=Query(tags=("site-a",)))
    groups.create("pilot", devices=["cam-3", "cam-4"])
    groups.create("nobody", devices=[])
    rollout = parts.rollouts.create("conv", "1", plan_=Plan(Target(group="site-a")))
    assert [d.device_id for d in rollout.devices] == ["cam-1", "cam-2", "cam-4"]
    assert rollout.plan["target"]["group"] == "site-a"
    # Criteria combine: the group and a tag.
    both = parts.rollouts.create("conv", "1", plan_=Plan(Target(group="pilot", tags=("site-a",))))
    assert [d.device_id for d in both.devices] == ["cam-4"]
    before = len(parts.rollouts.all())
    with pytest.raises(UnknownTargets, match="unknown group nowhere"):
        parts.rollouts.create("conv", "1", plan_=Plan(Target(group="nowhere")))
    with pytest.raises(InvalidInputError, match="group nobody has no devices"):
        parts.rollouts.create("conv", "1", plan_=Plan(Target(group="nobody")))
    assert len(parts.rollouts.all()) == before


def test_a_device_outside_its_window_waits_with_the_reason_and_is_updated_when_it_opens(parts: Parts) -> None:
    parts.rollouts.groups.create("site-a", query=Query(tags=("site-a",)))
    parts.rollouts.windows.add("0 2 * * *", 7200, "Europe/Paris", group="site-a")
    rollout = parts.rollouts.create("conv", "1", plan_=Plan(Target(all_devices=True)))
    # cam-3 is in no group with a window: it is sent its update at once; the others wait.
    assert sent(parts) == [("cam-3", 1)]
    details = {d.device_id: (d.status, d.detail) for d in rollout.devices}
    assert details["cam-1"] == (
        "waiting",
        "waiting for maintenance window (next opens 2026-12-08T02:00+01:00)",
    )
    assert details["cam-3"][0] == "pending"
    clock(parts).now = NIGHT - 1
    parts.rollouts.advance(rollout.id)
    assert sent(parts) == [("cam-3", 1)]
    clock(parts).now = NIGHT
    parts.rollouts.advance(rollout.id)
    assert sorted(sent(parts)) == [("cam-1", 1), ("cam-2", 1), ("cam-3", 1), ("cam-4", 1)]
    assert all(d.status == "pending" for d in parts.rollouts.get(rollout.id).devices)
    kinds = [(e.kind, e.device_id) for e in parts.rollouts.events(rollout.id)]
    assert kinds[-3:] == [("set_desired", "cam-1"), ("set_desired", "cam-2"), ("set_desired", "cam-4")]


def test_a_scheduled_rollout_sends_nothing_before_its_start(parts: Parts) -> None:
    start = AFTERNOON + 600
    scheduled = parts.rollouts.create(
        "conv", "1", plan_=Plan(Target(devices=("cam-2", "cam-3")), start_at=start)
    )
    assert sent(parts) == []
    assert (scheduled.wave, scheduled.state) == (0, "running")
    assert scheduled.reason == "scheduled to start at 2026-12-07T13:40:00+00:00"
    assert {d.detail for d in scheduled.devices} == {
        "wave 1; rollout scheduled to start at 2026-12-07T13:40:00+00:00"
    }
    assert "scheduled to start at 2026-12-07T13:40:00+00:00" in parts.rollouts.events(scheduled.id)[0].reason
    clock(parts).now = start
    parts.rollouts.advance(scheduled.id)
    assert sorted(sent(parts)) == [("cam-2", 1), ("cam-3", 1)]


def test_retry_failed_sends_again_only_to_the_devices_that_failed(parts: Parts) -> None:
    rollout = parts.rollouts.create("conv", "1", plan_=Plan(Target(devices=("cam-1", "cam-2", "cam-3"))))
    with pytest.raises(CommandRefused, match="no failed device"):
        parts.rollouts.retry_failed(rollout.id)
    report(parts, "cam-1", rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 1)
    report(parts, "cam-2", rollout.digest, fleet_pb2.MODEL_PHASE_FAILED, 1, error="disk full")
    report(parts, "cam-3", rollout.digest, fleet_pb2.MODEL_PHASE_DOWNLOADING, 1)
    assert parts.rollouts.get(rollout.id).status == "in_progress"
    sent(parts).clear()
    again = parts.rollouts.retry_failed(rollout.id, "disk cleaned")
    assert sent(parts) == [("cam-2", 2)]
    statuses = {d.device_id: (d.status, d.detail) for d in again.devices}
    assert statuses["cam-2"] == (
        "pending",
        "sent again (desired generation 2) after it failed: disk full",
    )
    assert statuses["cam-1"][0] == "active" and statuses["cam-3"][0] == "downloading"
    event = parts.rollouts.events(rollout.id)[-1]
    assert (event.kind, event.reason) == ("retry_failed", "operator: disk cleaned: cam-2")
    report(parts, "cam-2", rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 2)
    report(parts, "cam-3", rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 1)
    parts.rollouts.advance(rollout.id)
    done = parts.rollouts.get(rollout.id)
    assert (done.status, done.state) == ("succeeded", "succeeded")
    with pytest.raises(CommandRefused, match="it is succeeded"):
        parts.rollouts.retry_failed(rollout.id)


def test_retry_failed_runs_a_failed_staged_rollout_again(parts: Parts) -> None:
    p = Plan(Target(devices=("cam-1", "cam-2")), waves=(Wave(percent=100),), device_timeout_s=60)
    rollout = parts.rollouts.create("conv", "1", plan_=p)
    report(parts, "cam-1", rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 1)
    report(parts, "cam-2", rollout.digest, fleet_pb2.MODEL_PHASE_FAILED, 1, error="crashed")
    parts.rollouts.advance(rollout.id)
    assert parts.rollouts.get(rollout.id).state == "failed"
    sent(parts).clear()
    assert parts.rollouts.retry_failed(rollout.id).state == "running"
    assert sent(parts) == [("cam-2", 2)]
    report(parts, "cam-2", rollout.digest, fleet_pb2.MODEL_PHASE_ACTIVE, 2)
    parts.rollouts.advance(rollout.id)
    assert parts.rollouts.get(rollout.id).state == "succeeded"
