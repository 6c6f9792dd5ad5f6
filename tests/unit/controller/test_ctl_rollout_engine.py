"""Table tests of the pure rollout engine: builders in, steps out, no I/O."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2

from controller.errors import InvalidInputError
from controller.rollout_engine import (
    COMMANDS,
    AwaitApproval,
    Command,
    Complete,
    DeviceView,
    GoLive,
    Member,
    Pause,
    Phase,
    RollBack,
    Run,
    SetDesired,
    ShadowView,
    StartSoak,
    StartWave,
    State,
    Step,
    VersionStats,
    Wait,
    desired_with,
    plan,
)
from controller.rollout_plans import (
    FailureAction,
    Gates,
    Plan,
    ShadowGate,
    Target,
    Wave,
    split_waves,
    validate,
)

NOW = 10_000.0
OLD = fleet_pb2.ModelAssignment(tenant="default", model_name="m", model_version="1", artifact_digest="a" * 64)
NEW = fleet_pb2.ModelAssignment(
    tenant="default", model_name="m", model_version="2", artifact_digest="b" * 64, rollout_id="r"
)
NONE = VersionStats()
# Enough inferences for the gates to judge a device (STAGED's min_inferences is 10), all good.
SERVED = VersionStats(100, 0, 1.0)
STAGED = Plan(
    Target(all_devices=True),
    waves=(Wave(count=1, soak_s=30), Wave(percent=50, soak_s=30), Wave(percent=100, soak_s=0)),
    gates=Gates(max_error_rate=0.05, max_latency_ratio=2.0, min_reporting_fraction=0.5, min_inferences=10),
    failure_action=FailureAction.ROLLBACK,
    device_timeout_s=60,
)


def member(device_id: str, wave: int = 0, set_at: float | None = None) -> Member:
    return Member(device_id, wave, NEW, OLD, set_at)


def run(*members: Member, p: Plan = STAGED, **kw: Any) -> Run:
    return Run("r", "default", p, kw.pop("state", State.RUNNING), members, **kw)


def view(
    device_id: str,
    carries: fleet_pb2.ModelAssignment | None = OLD,
    status: str = "pending",
    online: bool = True,
    new: VersionStats = NONE,
    baseline: VersionStats = NONE,
    generation: int = 3,
) -> DeviceView:
    desired = fleet_pb2.DesiredState(
        device_id=device_id, generation=generation, models=[carries] if carries else []
    )
    return DeviceView(device_id, online, generation, desired, status, "", new, baseline)  # type: ignore[arg-type]


def expect_steps(steps: list[Step], *expected: tuple[Any, ...]) -> None:
    got: list[tuple[Any, ...]] = []
    for s in steps:
        if isinstance(s, SetDesired):
            got.append((s.action, s.device_id, s.desired.generation, s.revert))
        elif isinstance(s, StartWave | StartSoak | AwaitApproval | GoLive):
            got.append((s.action, s.wave))
        elif isinstance(s, Complete):
            got.append((s.action, s.state))
        elif isinstance(s, Wait):
            got.append((s.action, s.until))
        else:
            got.append((s.action,))
    assert got == list(expected), steps


def test_a_new_rollout_starts_its_first_wave() -> None:
    expect_steps(plan(run(member("a")), {"a": view("a")}, NOW), ("start_wave", 0))


def test_first_wave_sets_desired_only_for_its_members_keeping_other_tenants() -> None:
    other = fleet_pb2.ModelAssignment(tenant="audio", model_name="kws", artifact_digest="c" * 64)
    r = run(member("a"), member("b", wave=1), wave=0)
    a = view("a")
    a.desired.models.append(other)  # type: ignore[union-attr]
    steps = plan(r, {"a": a, "b": view("b")}, NOW)
    expect_steps(steps, ("set_desired", "a", 4, False))
    step = steps[0]
    assert isinstance(step, SetDesired)
    assert [(m.tenant, m.model_version) for m in step.desired.models] == [("audio", ""), ("default", "2")]
    assert step.desired.issued_at_ms == int(NOW * 1000)


def test_setting_is_idempotent_a_device_set_or_carrying_the_assignment_is_not_set_again() -> None:
    r = run(member("a", set_at=NOW - 1), member("b"), wave=0)
    steps = plan(r, {"a": view("a", carries=NEW, status="downloading"), "b": view("b", carries=NEW)}, NOW)
    expect_steps(steps, ("wait", NOW - 1 + 60))


def test_max_concurrent_limits_devices_updating_at_once() -> None:
    p = replace(STAGED, waves=(Wave(percent=100),), max_concurrent=2)
    r = run(member("a", set_at=NOW - 5), member("b"), member("c"), member("d"), p=p, wave=0)
    fleet = {"a": view("a", NEW, "downloading"), "b": view("b"), "c": view("c"), "d": view("d")}
    expect_steps(plan(r, fleet, NOW), ("set_desired", "b", 4, False))
    fleet["a"] = view("a", NEW, "active")
    expect_steps(plan(r, fleet, NOW), ("set_desired", "b", 4, False), ("set_desired", "c", 4, False))
    fleet["a"] = view("a", NEW, "downloading", online=False)
    expect_steps(plan(r, fleet, NOW), ("set_desired", "b", 4, False), ("set_desired", "c", 4, False))


def settled_wave(**kw: Any) -> Run:
    return run(member("a", set_at=NOW - 10), member("b", set_at=NOW - 10), member("c", 1), wave=0, **kw)


def test_soak_starts_when_every_device_settled_then_waits_then_advances() -> None:
    fleet = {
        "a": view("a", NEW, "active", new=SERVED),
        "b": view("b", NEW, "active", new=SERVED),
        "c": view("c"),
    }
    expect_steps(plan(settled_wave(), fleet, NOW), ("start_soak", 0))
    expect_steps(plan(settled_wave(soak_started_at=NOW - 5), fleet, NOW), ("wait", NOW + 25))
    expect_steps(plan(settled_wave(soak_started_at=NOW - 31), fleet, NOW), ("start_wave", 1))
    expect_steps(plan(settled_wave(soak_started_at=NOW - 5, promoted=True), fleet, NOW), ("start_wave", 1))


def test_manual_approval_holds_the_next_wave_until_approved() -> None:
    p = replace(STAGED, manual_approval=True)
    fleet = {
        "a": view("a", NEW, "active", new=SERVED),
        "b": view("b", NEW, "active", new=SERVED),
        "c": view("c"),
    }
    expect_steps(plan(settled_wave(p=p, soak_started_at=NOW - 31), fleet, NOW), ("await_approval", 0))
    waiting = settled_wave(p=p, soak_started_at=NOW - 31, state=State.AWAITING_APPROVAL)
    expect_steps(plan(waiting, fleet, NOW), ("wait", math.inf))
    approved = settled_wave(p=p, soak_started_at=NOW - 31, approved_wave=1)
    expect_steps(plan(approved, fleet, NOW), ("start_wave", 1))


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        (view("a", NEW, "failed"), view("b", NEW, "downloading"), "1 of 2 devices failed to update"),
        (
            view("a", NEW, "active", new=VersionStats(100, 11, 1.0)),
            view("b", NEW, "active", new=VersionStats(100, 0, 1.0)),
            "error rate 0.055 (11/200 inferences on 2 devices) exceeds 0.05",
        ),
        (
            view("a", NEW, "active", new=VersionStats(50, 0, 5.0), baseline=VersionStats(50, 0, 1.0)),
            view("b", NEW, "active", new=VersionStats(50, 0, 5.5), baseline=VersionStats(50, 0, 1.0)),
            "p95 latency 5.25x the previous version",
        ),
    ],
)
def test_a_failing_gate_rolls_back_with_the_reason(a: DeviceView, b: DeviceView, reason: str) -> None:
    r = settled_wave(soak_started_at=NOW - 1)
    [step] = plan(r, {"a": a, "b": b, "c": view("c")}, NOW)
    assert isinstance(step, RollBack) and step.reason.startswith("wave 1 of 3: ")
    assert reason in step.reason


def test_gates_ignore_devices_below_the_inference_minimum_and_pause_when_asked() -> None:
    p = replace(STAGED, failure_action=FailureAction.PAUSE)
    quiet = view("a", NEW, "active", new=VersionStats(5, 5, 9.0), baseline=VersionStats(5, 0, 1.0))
    fleet = {"a": quiet, "b": view("b", NEW, "active"), "c": view("c")}
    expect_steps(plan(settled_wave(p=p, soak_started_at=NOW - 1), fleet, NOW), ("wait", NOW + 29))
    fleet["b"] = view("b", NEW, "failed")
    [step] = plan(settled_wave(p=p, soak_started_at=NOW - 1), fleet, NOW)
    assert isinstance(step, Pause) and "1 of 2 devices failed" in step.reason


def test_an_offline_device_past_its_timeout_counts_against_reporting_not_as_a_failure() -> None:
    r = run(member("a", set_at=NOW - 61), member("b", set_at=NOW - 61), member("c", 1), wave=0)
    fleet = {
        "a": view("a", NEW, "pending", online=False),
        "b": view("b", NEW, "active", new=SERVED),
        "c": view("c"),
    }
    expect_steps(plan(r, fleet, NOW), ("start_soak", 0))
    soaked = replace(r, soak_started_at=NOW - 31)
    expect_steps(plan(soaked, fleet, NOW), ("start_wave", 1))  # 1 of 2 reported >= 0.5
    strict = replace(soaked, plan=replace(STAGED, gates=replace(STAGED.gates, min_reporting_fraction=0.9)))
    [step] = plan(strict, fleet, NOW)
    assert isinstance(step, RollBack) and "only 1 of 2 devices reported" in step.reason
    # Online and silent past the timeout: that one is a failure.
    fleet["a"] = view("a", NEW, "downloading", online=True)
    [step] = plan(r, fleet, NOW)
    assert isinstance(step, RollBack) and "1 of 2 devices failed" in step.reason


def test_last_wave_completes_succeeded_or_failed() -> None:
    p = replace(STAGED, waves=(Wave(percent=100),), gates=Gates(max_failure_fraction=1.0))
    r = run(member("a", set_at=NOW), member("b", set_at=NOW), p=p, wave=0, soak_started_at=NOW)
    expect_steps(
        plan(r, {"a": view("a", NEW, "active"), "b": view("b", NEW, "active")}, NOW),
        ("complete", State.SUCCEEDED),
    )
    expect_steps(
        plan(r, {"a": view("a", NEW, "active"), "b": view("b", NEW, "failed")}, NOW),
        ("complete", State.FAILED),
    )


def test_rolling_back_reverts_only_devices_that_carry_the_rollout_then_completes() -> None:
    r = run(
        member("a", set_at=NOW), member("b", set_at=NOW), member("c", 1), wave=0, state=State.ROLLING_BACK
    )
    fleet = {"a": view("a", NEW, "active"), "b": view("b", OLD), "c": view("c")}
    steps = plan(r, fleet, NOW)
    expect_steps(steps, ("set_desired", "a", 4, True))
    assert isinstance(steps[0], SetDesired) and list(steps[0].desired.models) == [OLD]
    fleet["a"] = view("a", OLD, generation=4)
    expect_steps(plan(r, fleet, NOW), ("complete", State.ROLLED_BACK))
    # A device that had no model for the tenant goes back to none.
    bare = replace(r, members=(Member("a", 0, NEW, None, NOW),))
    [step] = plan(bare, {"a": view("a", NEW)}, NOW)
    assert isinstance(step, SetDesired) and list(step.desired.models) == []


@pytest.mark.parametrize("state", [State.PAUSED, State.AWAITING_APPROVAL])
def test_paused_and_awaiting_wait_forever(state: State) -> None:
    expect_steps(plan(run(member("a"), state=state, wave=0), {"a": view("a")}, NOW), ("wait", math.inf))


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.FAILED, State.ROLLED_BACK, State.ABORTED])
def test_finished_rollouts_plan_nothing(state: State) -> None:
    assert plan(run(member("a"), state=state), {"a": view("a")}, NOW) == []


def test_command_table() -> None:
    assert COMMANDS[(State.RUNNING, Command.PAUSE)] is State.PAUSED
    assert COMMANDS[(State.PAUSED, Command.RESUME)] is State.RUNNING
    assert COMMANDS[(State.AWAITING_APPROVAL, Command.APPROVE)] is State.RUNNING
    assert COMMANDS[(State.SUCCEEDED, Command.ROLLBACK)] is State.ROLLING_BACK
    assert (State.ROLLING_BACK, Command.ABORT) not in COMMANDS
    assert COMMANDS[(State.RUNNING, Command.ABORT)] is State.ABORTING
    assert COMMANDS[(State.ABORTING, Command.ROLLBACK)] is State.ROLLING_BACK
    assert (State.ROLLED_BACK, Command.RESUME) not in COMMANDS


def test_desired_with_bumps_the_generation_and_replaces_the_tenant() -> None:
    d = desired_with(view("a", OLD, generation=7), "default", NEW, NOW)
    assert (d.generation, list(d.models)) == (8, [NEW])


def test_split_waves_rounds_percentages_up_and_the_last_wave_takes_the_rest() -> None:
    ids = [f"d{i:02}" for i in range(20)]
    waves = split_waves(ids, (Wave(percent=10), Wave(count=3), Wave(percent=10)))
    assert [len(w) for w in waves] == [2, 3, 15]
    assert waves[0] == ["d00", "d01"]
    assert [len(w) for w in split_waves(["a"], (Wave(percent=10), Wave(percent=50)))] == [1, 0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Plan(Target()), "needs a target"),
        (Plan(Target(all_devices=True), waves=()), "at least one wave"),
        (Plan(Target(all_devices=True), waves=(Wave(count=1, percent=5),)), "wave 1: give either"),
        (Plan(Target(all_devices=True), waves=(Wave(percent=0),)), "percentage must be"),
        (Plan(Target(all_devices=True), gates=Gates(max_error_rate=2)), "max_error_rate must be between"),
        (Plan(Target(all_devices=True), max_concurrent=-1), "max_concurrent"),
    ],
)
def test_bad_plans_name_the_problem(bad: Plan, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        validate(bad)


def test_plan_round_trips_through_json_and_knows_when_it_is_staged() -> None:
    assert Plan.from_json(STAGED.to_json()) == STAGED
    assert STAGED.staged and not Plan(Target(devices=("a",))).staged


def test_confidence_gate_compares_the_new_versions_mean_confidence_with_the_previous_on_the_same_devices() -> (
    None
):
    p = replace(STAGED, gates=Gates(min_confidence_ratio=0.9, min_inferences=10))

    def conf(new: float, old: float) -> DeviceView:
        return view(
            "a",
            NEW,
            "active",
            new=VersionStats(50, 0, 1.0, confidence_samples=50, confidence_mean=new),
            baseline=VersionStats(50, 0, 1.0, confidence_samples=50, confidence_mean=old),
        )

    r = run(member("a", set_at=NOW - 10), member("c", 1), p=p, wave=0, soak_started_at=NOW - 1)
    expect_steps(plan(r, {"a": conf(0.88, 0.9), "c": view("c")}, NOW), ("wait", NOW + 29))
    [step] = plan(r, {"a": conf(0.6, 0.9), "c": view("c")}, NOW)
    assert isinstance(step, RollBack)
    assert "mean confidence 0.600 is 0.67x the previous version's 0.900 on the same 1 devices" in step.reason


def test_prediction_psi_gate_compares_class_distributions_on_the_same_devices() -> None:
    p = replace(STAGED, gates=Gates(max_prediction_psi=0.25, min_inferences=10))

    def classes(new: tuple[int, ...], old: tuple[int, ...]) -> DeviceView:
        return view("a", NEW, "active", new=VersionStats(classes=new), baseline=VersionStats(classes=old))

    r = run(member("a", set_at=NOW - 10), member("c", 1), p=p, wave=0, soak_started_at=NOW - 1)
    expect_steps(plan(r, {"a": classes((48, 52), (50, 50)), "c": view("c")}, NOW), ("wait", NOW + 29))
    [step] = plan(r, {"a": classes((95, 5, 0), (50, 50)), "c": view("c")}, NOW)
    assert isinstance(step, RollBack)
    assert "predicted-class PSI" in step.reason and "on the same 1 devices exceeds 0.25" in step.reason


# -- the shadow phase: the candidate beside the live model before a wave goes live ------------------

SHADOW_GATE = ShadowGate(soak_s=20, min_agreement=0.95, min_compared=50)
SHADOWED = replace(STAGED, shadow=SHADOW_GATE)
CANDIDATE = Member("x", 0, NEW, OLD).shadow()


def shadowed(*members: Member, **kw: Any) -> Run:
    return run(*members, p=kw.pop("p", SHADOWED), wave=kw.pop("wave", 0), phase=Phase.SHADOW, **kw)


def in_shadow(
    device_id: str, status: str = "active", compared: int = 0, agreement: float = 0.0, online: bool = True
) -> DeviceView:
    v = view(device_id, OLD, online=online)
    v.desired.models.append(CANDIDATE)  # type: ignore[union-attr]
    return replace(v, shadow_status=status, shadow=ShadowView(compared, agreement, 0.1))  # type: ignore[arg-type]


def shadow_member(device_id: str, wave: int = 0, at: float | None = NOW - 10) -> Member:
    return Member(device_id, wave, NEW, OLD, shadow_set_at=at)


def test_shadow_phase_sets_the_candidate_as_the_shadow_tenant_keeping_the_live_assignment() -> None:
    steps = plan(shadowed(member("a"), member("c", 1)), {"a": view("a"), "c": view("c")}, NOW)
    expect_steps(steps, ("set_desired", "a", 4, False))
    [step] = steps
    assert isinstance(step, SetDesired) and step.shadow
    assert [(m.tenant, m.model_version) for m in step.desired.models] == [
        ("default", "1"),
        ("default.shadow", "2"),
    ]
    assert (
        step.desired.models[1].probation_s == 0
        and step.desired.models[1].artifact_digest == NEW.artifact_digest
    )


def test_shadow_phase_waits_for_the_candidate_to_load_then_soaks() -> None:
    r = shadowed(shadow_member("a"), shadow_member("b"), member("c", 1))
    loading = {"a": in_shadow("a", "loading"), "b": in_shadow("b"), "c": view("c")}
    expect_steps(plan(r, loading, NOW), ("wait", NOW - 10 + 60))
    loaded = {"a": in_shadow("a"), "b": in_shadow("b"), "c": view("c")}
    expect_steps(plan(r, loaded, NOW), ("start_soak", 0))
    expect_steps(plan(replace(r, soak_started_at=NOW - 5), loaded, NOW), ("wait", NOW + 15))


def _judged(a: DeviceView, b: DeviceView, p: Plan = SHADOWED) -> list[Step]:
    r = shadowed(shadow_member("a"), shadow_member("b"), member("c", 1), p=p, soak_started_at=NOW - 21)
    return plan(r, {"a": a, "b": b, "c": view("c")}, NOW)


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        # Agreement is the mean weighted by samples compared: (100 * 0.99 + 300 * 0.90) / 400 = 0.9225.
        (
            in_shadow("a", compared=100, agreement=0.99),
            in_shadow("b", compared=300, agreement=0.90),
            "top-1 agreement with the live model 0.922 (400 samples compared on 2 of 2 devices) is below 0.95",
        ),
        (
            in_shadow("a", compared=10, agreement=1.0),
            in_shadow("b", compared=3),
            "no device compared 50 samples",
        ),
        (
            in_shadow("a", "failed"),
            in_shadow("b", compared=100, agreement=1.0),
            "1 of 2 devices could not load",
        ),
    ],
    ids=["disagrees", "no-evidence", "load-failed"],
)
def test_a_failing_shadow_gate_rolls_back_and_nothing_goes_live(
    a: DeviceView, b: DeviceView, reason: str
) -> None:
    [step] = _judged(a, b)
    assert isinstance(step, RollBack), step
    assert step.reason.startswith("wave 1 of 3: shadow") and reason in step.reason


def test_devices_short_of_compared_samples_count_against_reporting_and_pause_when_asked() -> None:
    p = replace(SHADOWED, failure_action=FailureAction.PAUSE)
    a, b = in_shadow("a", compared=200, agreement=1.0), in_shadow("b", compared=49, agreement=0.1)
    # 1 of 2 devices with enough samples meets min_reporting_fraction 0.5; b's 0.1 does not count.
    expect_steps(_judged(a, b, p), ("go_live", 0))
    strict = replace(p, gates=replace(p.gates, min_reporting_fraction=0.9))
    [step] = _judged(a, b, strict)
    assert isinstance(step, Pause) and "only 1 of 2 devices compared 50 samples (need 0.9)" in step.reason


def test_a_passing_shadow_gate_goes_live_then_the_live_set_clears_the_shadow() -> None:
    a, b = in_shadow("a", compared=100, agreement=0.97), in_shadow("b", compared=100, agreement=0.99)
    [step] = _judged(a, b)
    assert isinstance(step, GoLive) and "top-1 agreement 0.980" in step.reason
    live = run(shadow_member("a"), shadow_member("b"), member("c", 1), p=SHADOWED, wave=0, phase=Phase.LIVE)
    steps = plan(live, {"a": a, "b": b, "c": view("c")}, NOW)
    expect_steps(steps, ("set_desired", "a", 4, False), ("set_desired", "b", 4, False))
    assert isinstance(steps[0], SetDesired) and not steps[0].shadow
    assert list(steps[0].desired.models) == [NEW]


def test_promote_skips_the_shadow_gate() -> None:
    r = shadowed(shadow_member("a"), member("c", 1), promoted=True)
    expect_steps(plan(r, {"a": in_shadow("a", "loading"), "c": view("c")}, NOW), ("go_live", 0))


def test_rolling_back_from_the_shadow_phase_clears_the_shadow_and_keeps_the_live_model() -> None:
    r = shadowed(shadow_member("a"), member("b"), member("c", 1), state=State.ROLLING_BACK)
    steps = plan(r, {"a": in_shadow("a"), "b": view("b"), "c": view("c")}, NOW)
    expect_steps(steps, ("set_desired", "a", 4, True))
    assert isinstance(steps[0], SetDesired) and list(steps[0].desired.models) == [OLD]
    assert steps[0].reason == "shadow candidate cleared"
    [done] = plan(r, {"a": view("a", generation=4), "b": view("b"), "c": view("c")}, NOW)
    assert isinstance(done, Complete) and "restored on the 1 devices" in done.reason


def test_aborting_clears_shadow_candidates_only_then_completes_as_aborted() -> None:
    # a: candidate in shadow; b: its wave already went live; c: never touched.
    r = shadowed(
        shadow_member("a"), member("b"), member("c", 1), state=State.ABORTING, reason="operator: abort"
    )
    live_b = view("b", NEW)
    steps = plan(r, {"a": in_shadow("a"), "b": live_b, "c": view("c")}, NOW)
    expect_steps(steps, ("set_desired", "a", 4, True))
    assert isinstance(steps[0], SetDesired) and list(steps[0].desired.models) == [OLD]
    assert "shadow candidate cleared" in steps[0].reason
    [done] = plan(r, {"a": view("a", generation=4), "b": live_b, "c": view("c")}, NOW)
    assert isinstance(done, Complete) and done.state is State.ABORTED and done.reason == "operator: abort"


def test_aborting_a_rollout_without_a_shadow_phase_completes_at_once() -> None:
    r = run(member("a"), state=State.ABORTING, wave=0)
    [done] = plan(r, {"a": view("a", NEW)}, NOW)
    assert isinstance(done, Complete) and done.state is State.ABORTED


def test_shadow_plans_validate_and_round_trip() -> None:
    assert Plan.from_json(SHADOWED.to_json()) == SHADOWED and SHADOWED.staged
    assert replace(STAGED, shadow=None).to_json()["shadow"] is None
    legacy = STAGED.to_json()
    del legacy["shadow"]
    assert Plan.from_json(legacy) == STAGED
    with pytest.raises(InvalidInputError, match=r"shadow\.min_agreement must be between"):
        validate(replace(SHADOWED, shadow=ShadowGate(soak_s=1, min_agreement=1.5)))
    with pytest.raises(InvalidInputError, match=r"shadow\.min_compared"):
        validate(replace(SHADOWED, shadow=ShadowGate(soak_s=1, min_compared=0)))


def test_the_deviation_gate_judges_models_that_are_not_classifiers() -> None:
    p = replace(SHADOWED, shadow=ShadowGate(soak_s=20, max_deviation=0.05, min_compared=50))
    a, b = in_shadow("a", compared=100), in_shadow("b", compared=100)  # deviation 0.1 each, no top-1
    [step] = _judged(a, b, p)
    assert isinstance(step, RollBack)
    assert (
        "mean deviation from the live model 0.1 (200 samples compared on 2 of 2 devices) exceeds 0.05"
        in step.reason
    )
    loose = replace(p, shadow=ShadowGate(soak_s=20, max_deviation=0.2, min_compared=50))
    expect_steps(_judged(a, b, loose), ("go_live", 0))


def test_a_candidate_failing_its_shadow_inferences_is_stopped_without_waiting_for_the_soak() -> None:
    failing = replace(in_shadow("a"), shadow_stats=VersionStats(inferences=40, errors=40))
    r = shadowed(shadow_member("a"), shadow_member("b"), member("c", 1))
    # b is still loading its candidate: the gate does not wait for it.
    [step] = plan(r, {"a": failing, "b": in_shadow("b", "loading"), "c": view("c")}, NOW)
    assert isinstance(step, RollBack), step
    assert step.reason == (
        "wave 1 of 3: shadow: error rate 1.000 (40/40 shadow inferences on 1 devices) exceeds 0.05; "
        "nothing went live"
    )
    # Below min_inferences a device is not judged yet.
    few = replace(in_shadow("a"), shadow_stats=VersionStats(inferences=5, errors=5))
    expect_steps(
        plan(r, {"a": few, "b": in_shadow("b", "loading"), "c": view("c")}, NOW), ("wait", NOW - 10 + 60)
    )


def test_the_error_gate_counts_every_inference_of_the_new_version() -> None:
    # 2 of 100 inferences failed on a, 30 of 30 on b: 32/130 over the wave.
    a = view("a", NEW, "active", new=VersionStats(inferences=100, errors=2))
    b = view("b", NEW, "active", new=VersionStats(inferences=30, errors=30))
    r = run(member("a", set_at=NOW - 5), member("b", set_at=NOW - 5), member("c", 1), wave=0)
    [step] = plan(r, {"a": a, "b": b, "c": view("c")}, NOW)
    assert isinstance(step, RollBack)
    assert step.reason == "wave 1 of 3: error rate 0.246 (32/130 inferences on 2 devices) exceeds 0.05"


# -- evidence: gates that read inferences judge nothing until devices made enough of them ------------

FEW = VersionStats(5, 5, 9.0)  # below min_inferences (10): the gates do not judge it


def quiet_wave(**kw: Any) -> tuple[Run, dict[str, DeviceView]]:
    """Wave 1 of 3 soaked: a, b and d serve version 2 since NOW - 10 but made too few inferences of it;
    c is in wave 2."""
    r = run(
        *(member(d, set_at=NOW - 10) for d in "abd"), member("c", 1), wave=0, soak_started_at=NOW - 31, **kw
    )
    fleet = {d: view(d, NEW, "active", new=FEW, baseline=SERVED) for d in "abd"}
    return r, {**fleet, "c": view("c")}


def test_a_wave_without_enough_inferences_waits_then_stops_naming_the_evidence() -> None:
    r, fleet = quiet_wave()
    # Its soak is over, yet the gates have judged nobody: it waits, for half of them
    # (min_reporting_fraction), at most device_timeout_s (60 s) from its soak's start at NOW - 31.
    [step] = plan(r, fleet, NOW)
    assert isinstance(step, Wait) and step.until == NOW - 31 + 60, step
    assert (
        step.reason
        == "wave 1 of 3: waiting for evidence: 0 of 3 devices reported 10 inferences of m 2 (need 2)"
    )
    fleet["a"] = replace(fleet["a"], new=SERVED)
    [step] = plan(r, fleet, NOW + 28)
    assert isinstance(step, Wait) and "1 of 3 devices reported 10 inferences" in step.reason
    # Too little at the bound: stopped with what was missing.
    [step] = plan(r, fleet, NOW + 29)
    assert isinstance(step, RollBack), step
    assert (
        step.reason
        == "wave 1 of 3: only 1 of 3 devices reported 10 inferences of m 2 within 60 s of updating (need 2)"
    )
    # Enough in time: the gates judge it, and it passes or fails on what they find.
    fleet["b"] = replace(fleet["b"], new=SERVED)
    expect_steps(plan(r, fleet, NOW + 28), ("start_wave", 1))
    fleet["b"] = replace(fleet["b"], new=VersionStats(100, 30, 1.0))
    [step] = plan(r, fleet, NOW + 28)
    assert isinstance(step, RollBack) and "error rate 0.150 (30/200 inferences on 2 devices)" in step.reason


def test_the_last_wave_does_not_succeed_on_gates_that_judged_nobody() -> None:
    p = replace(STAGED, waves=(Wave(percent=100, soak_s=30),), failure_action=FailureAction.PAUSE)
    r, fleet = quiet_wave(p=p)
    r = replace(r, members=tuple(m for m in r.members if m.device_id != "c"))
    del fleet["c"]
    expect_steps(plan(r, fleet, NOW), ("wait", NOW + 29))
    [step] = plan(r, fleet, NOW + 29)
    assert isinstance(step, Pause) and "only 0 of 3 devices reported 10 inferences" in step.reason
    fleet = {d: replace(v, new=SERVED) for d, v in fleet.items()}
    expect_steps(plan(r, fleet, NOW + 29), ("complete", State.SUCCEEDED))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # No gate reads inferences: the failure fraction and reporting gates are all there is.
        ({"gates": Gates(max_failure_fraction=0.0, min_reporting_fraction=0.5)}, ("start_wave", 1)),
        # No device timeout: the wave waits for evidence as long as it takes.
        ({"device_timeout_s": None}, ("wait", math.inf)),
    ],
)
def test_evidence_is_needed_only_by_gates_that_read_inferences_and_waited_for_within_the_timeout(
    change: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    r, fleet = quiet_wave(p=replace(STAGED, **change))
    expect_steps(plan(r, fleet, NOW + 3600), expected)


def test_a_promoted_wave_needs_no_evidence() -> None:
    r, fleet = quiet_wave(promoted=True)
    expect_steps(plan(r, fleet, NOW), ("start_wave", 1))


def test_a_passing_verdict_gives_the_figures_its_gates_measured() -> None:
    fleet = {
        "a": view("a", NEW, "active", new=VersionStats(100, 1, 1.2), baseline=VersionStats(100, 0, 1.0)),
        "b": view("b", NEW, "active", new=VersionStats(50, 0, 1.5), baseline=VersionStats(80, 0, 1.0)),
        "c": view("c"),
    }
    [step] = plan(settled_wave(soak_started_at=NOW - 31), fleet, NOW)
    assert isinstance(step, StartWave)
    assert step.reason == (
        "wave 1 of 3 passed its gates (0 of 2 devices failed, error rate 0.007 (1/150 inferences),"
        " p95 latency 1.35x the previous version, 2 devices judged)"
    )
    p = replace(STAGED, waves=(Wave(percent=100),), gates=Gates(max_failure_fraction=1.0))
    r = run(member("a", set_at=NOW), member("b", set_at=NOW), p=p, wave=0, soak_started_at=NOW)
    [done] = plan(r, {"a": view("a", NEW, "active"), "b": view("b", NEW, "active")}, NOW)
    assert isinstance(done, Complete)
    assert done.reason == "wave 1 of 1 done (0 of 2 devices failed); all 2 devices updated"
