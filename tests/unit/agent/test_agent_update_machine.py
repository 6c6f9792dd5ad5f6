"""The update state machine's table, resume switch and probation judge; the planner's probation steps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.reconciler import (
    Activate,
    Commit,
    Current,
    MarkApplied,
    Phase,
    ReportState,
    RequestManifest,
    RollBack,
    Wait,
    build_report,
    plan,
)
from agent.state import Assignment, Desired, DeviceState, Installed, TenantState, Update
from agent.update_machine import (
    TRANSITIONS,
    UnhandledTransition,
    UpdateEvent,
    UpdateState,
    advance,
    judge_probation,
    next_state,
    resume,
)

S, E = UpdateState, UpdateEvent
A1 = Assignment("default", "m", "1", "1" * 64, 100)
A2 = Assignment("default", "m", "2", "2" * 64, 100, probation_s=10.0, max_error_rate=0.1)


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (S.FETCH, E.FETCHED, S.VERIFY),
        (S.VERIFY, E.VERIFIED, S.STAGE),
        (S.STAGE, E.STAGED, S.ACTIVATE),
        (S.STAGE, E.ERROR, S.FAILED),
        (S.ACTIVATE, E.ACTIVATED, S.PROBATION),
        (S.PROBATION, E.PROBATION_PASSED, S.COMMIT),
        (S.PROBATION, E.PROBATION_FAILED, S.ROLLBACK),
        (S.COMMIT, E.COMMITTED, S.COMMITTED),
        (S.ROLLBACK, E.ROLLED_BACK, S.ROLLED_BACK),
    ],
)
def test_transition_table(state: UpdateState, event: UpdateEvent, after: UpdateState) -> None:
    assert next_state(state, event) is after


def test_an_unhandled_event_is_a_loud_bug_and_finals_have_no_way_out() -> None:
    with pytest.raises(UnhandledTransition, match="no transition from commit on probation_failed"):
        next_state(S.COMMIT, E.PROBATION_FAILED)
    assert not [k for k in TRANSITIONS if k[0] in (S.COMMITTED, S.FAILED, S.ROLLED_BACK)]
    # A model that served is never "failed": it is rolled back.
    assert (S.PROBATION, E.ERROR) in TRANSITIONS and TRANSITIONS[(S.PROBATION, E.ERROR)] is S.ROLLBACK


@pytest.mark.parametrize(
    ("persisted", "after"),
    [
        (S.FETCH, S.FETCH),
        (S.VERIFY, S.VERIFY),
        (S.STAGE, S.STAGE),
        (S.ACTIVATE, S.ROLLBACK),
        (S.PROBATION, S.ROLLBACK),
        (S.ROLLBACK, S.ROLLBACK),
        (S.COMMIT, S.COMMIT),
        (S.COMMITTED, S.COMMITTED),
    ],
)
def test_resume_switch(persisted: UpdateState, after: UpdateState) -> None:
    assert resume(persisted) is after


def test_the_table_gives_every_move_entry_and_re_entry_included() -> None:
    assert advance(None, E.ASSIGNED) is S.FETCH
    assert advance(S.COMMITTED, E.VERIFIED) is S.STAGE  # a new update begins where its artifact is
    assert advance(S.STAGE, E.VERIFIED) is S.STAGE  # resume repeats the state's work
    assert advance(S.PROBATION, E.PROBATION_FAILED) is S.ROLLBACK
    assert advance(S.ACTIVATE, E.ACTIVATED) is S.PROBATION
    assert advance(S.ACTIVATE, E.NOT_SWAPPED) is S.STAGE
    with pytest.raises(UnhandledTransition, match="no transition from fetch on probation_passed"):
        advance(S.FETCH, E.PROBATION_PASSED)
    with pytest.raises(UnhandledTransition):
        advance(None, E.ACTIVATED)
    # Rolling back is the answer to a failed probation, not to an activation that never got there.
    with pytest.raises(UnhandledTransition):
        advance(S.ACTIVATE, E.PROBATION_FAILED)


def test_probation_judge() -> None:
    assert judge_probation(10, 2, 0.1, now=1.0, until=5.0)[0] is E.PROBATION_FAILED
    assert judge_probation(10, 1, 0.1, now=1.0, until=5.0) == (None, "")
    assert judge_probation(0, 0, 0.0, now=5.0, until=5.0)[0] is E.PROBATION_PASSED
    assert "error rate 0.200 (2/10 inferences) exceeds 0.1" in judge_probation(10, 2, 0.1, 1.0, 5.0)[1]


def on_probation(base: tuple[int, int] = (100, 0), probes: tuple[int, int] = (100, 0)) -> Current:
    state = DeviceState(
        desired=Desired(2, (A2,)),
        applied_generation=1,
        tenants={"default": TenantState(Installed(A2, "/m/2"), Installed(A1, "/m/1"))},
        updates={"default": Update(A2, S.PROBATION.value, "", 50.0, *base)},
    )
    return Current(state=state, installed=frozenset({A1.digest, A2.digest}), probes={"default": probes})


def test_planner_watches_probation_then_commits_or_rolls_back() -> None:
    steps = plan(on_probation().state.desired, on_probation(), now=40.0)
    assert [type(s) for s in steps] == [ReportState, Wait]
    assert isinstance(steps[1], Wait) and steps[1].until == 40.25
    ok = plan(on_probation().state.desired, on_probation(probes=(150, 5)), now=50.0)
    assert [s for s in ok if isinstance(s, Commit)] == [Commit("default", "50 inferences, 5 errors")]
    bad = plan(on_probation().state.desired, on_probation(probes=(110, 3)), now=41.0)
    [rollback] = [s for s in bad if isinstance(s, RollBack)]
    assert "error rate 0.300 (3/10 inferences) exceeds 0.1" in rollback.reason


def test_an_assignment_without_probation_commits_whatever_it_served_before_the_first_check() -> None:
    """``probation_s = 0`` means no probation (a shadow candidate, a plan without one): the errors
    its first inferences made before the planner looked are the controller's gates' to judge. A
    rollback here would report "failed to update" (or "could not load" in a shadow phase) on a
    busy device, and pass on an idle one."""
    no_probation = replace(A2, probation_s=0.0, max_error_rate=0.0)
    state = on_probation(probes=(110, 10)).state
    state = replace(
        state,
        desired=Desired(2, (no_probation,)),
        tenants={"default": TenantState(Installed(no_probation, "/m/2"), Installed(A1, "/m/1"))},
        updates={"default": Update(no_probation, S.PROBATION.value, "", 40.0, 100, 0)},
    )
    current = Current(state=state, installed=frozenset({A1.digest, A2.digest}), probes={"default": (110, 10)})
    steps = plan(state.desired, current, now=40.5)
    assert [s for s in steps if isinstance(s, RollBack)] == [], steps
    assert [s.tenant for s in steps if isinstance(s, Commit)] == ["default"], steps


def test_report_shows_probation_phase_and_outcomes() -> None:
    current = on_probation()
    [entry] = build_report(current.state.desired, current).models
    assert (entry.phase, entry.update_state, entry.outcome) == (Phase.PROBATION, "probation", "")
    state = current.state.with_update("default", Update(A2, S.COMMITTED.value))
    [entry] = build_report(state.desired, Current(state=state)).models
    assert (entry.phase, entry.outcome) == (Phase.ACTIVE, "succeeded")


def test_a_removed_tenant_ends_its_update_failed_before_it_served_rolled_back_on_probation() -> None:
    for state in (S.FETCH, S.VERIFY, S.STAGE):
        assert next_state(state, E.REMOVED) is S.FAILED
    # Nothing of the tenant serves any more: there is no rollback to go through.
    assert next_state(S.PROBATION, E.REMOVED) is S.ROLLED_BACK
    for state in (S.ACTIVATE, S.ROLLBACK, S.COMMIT):  # these finish in one step or on start
        with pytest.raises(UnhandledTransition):
            next_state(state, E.REMOVED)


def test_a_newer_version_supersedes_an_update_before_it_served_or_rolls_back_one_on_probation() -> None:
    for state in (S.FETCH, S.VERIFY, S.STAGE):
        assert next_state(state, E.SUPERSEDED) is S.FAILED
    assert next_state(S.PROBATION, E.SUPERSEDED) is S.ROLLBACK
    with pytest.raises(UnhandledTransition):
        next_state(S.COMMIT, E.SUPERSEDED)  # a commit in progress finishes: the model proved itself


A3 = Assignment("default", "m", "3", "3" * 64, 100, probation_s=10.0, max_error_rate=0.1)


def superseding(*assignments: Assignment, installed: frozenset[str] = frozenset()) -> tuple[Desired, Current]:
    """Version 2 on probation (version 1 committed before it) when generation 3 arrives."""
    current = on_probation()
    desired = Desired(3, assignments)
    state = replace(current.state, desired=desired)
    return desired, replace(current, state=state, installed=current.installed | installed)


def test_a_newer_version_during_probation_rolls_back_to_the_committed_model_before_anything_else() -> None:
    desired, current = superseding(A3)
    steps = plan(desired, current, now=41.0)
    work = [s for s in steps if not isinstance(s, (ReportState, Wait))]
    assert work == [RollBack("default", "superseded by m 3 (desired generation 3)", E.SUPERSEDED)]
    # Once it is rolled back (version 1 serves, no previous), version 3 is fetched as a plain update.
    state = replace(
        current.state,
        tenants={"default": TenantState(Installed(A1, "/m/1"), None)},
        updates={"default": Update(A2, S.ROLLED_BACK.value, "superseded by m 3")},
    )
    after = plan(desired, replace(current, state=state), now=41.0)
    assert [type(s) for s in after if not isinstance(s, ReportState)] == [RequestManifest]


def test_the_controller_rolling_back_during_probation_serves_the_committed_model_without_a_download() -> None:
    desired, current = superseding(A1)
    work = [s for s in plan(desired, current, now=41.0) if not isinstance(s, (ReportState, Wait))]
    assert work == [
        RollBack("default", "the controller rolled back to m 1 (desired generation 3)", E.SUPERSEDED)
    ]
    state = replace(
        current.state,
        tenants={"default": TenantState(Installed(A1, "/m/1"), None)},
        updates={"default": Update(A2, S.ROLLED_BACK.value, "the controller rolled back to m 1")},
    )
    after = plan(desired, replace(current, state=state), now=41.0)
    assert not [s for s in after if isinstance(s, (RequestManifest, Activate, RollBack))]
    assert [s for s in after if isinstance(s, MarkApplied)] == [MarkApplied(3)]


def test_the_same_artifact_assigned_anew_during_probation_is_activated_again_not_rolled_back() -> None:
    desired, current = superseding(replace(A2, rollout_id="again"))
    work = [s for s in plan(desired, current, now=41.0) if not isinstance(s, (ReportState, Wait))]
    assert work == [Activate(replace(A2, rollout_id="again"))]


def test_a_superseded_probation_rolls_back_before_another_tenant_fetches_the_new_artifact() -> None:
    # Tenant "b" comes first in the desired state and wants the same new artifact.
    b3 = replace(A3, tenant="b")
    desired, current = superseding(b3, A3)
    work = [s for s in plan(desired, current, now=41.0) if not isinstance(s, (ReportState, Wait))]
    assert [type(s) for s in work] == [RollBack, RequestManifest]
