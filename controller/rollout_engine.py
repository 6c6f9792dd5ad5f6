"""The rollout engine: a pure planner over a rollout's persisted run and a fleet snapshot.

``plan(run, fleet, now) -> list[Step]`` decides what happens next; the
executors (:mod:`controller.rollout_executor`) persist each step with its
reason in the rollout's event log and only then act. Steps are idempotent by
construction: a device's desired state is set only while it does not carry the
wanted assignment and the device was never set by this rollout, a wave starts
only once. A controller killed at any point plans again from what is stored
and does nothing twice.

Rollout states and the operator's commands are one transition table,
:data:`COMMANDS`; the engine's own transitions are the steps it returns.
Wall-clock seconds throughout: they are stored and must survive a restart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar, Literal

from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import SHADOW_SUFFIX, tenant_or_default

from controller import drift
from controller.maintenance import ALWAYS, WindowStatus
from controller.rollout_plans import FailureAction, Gates, Plan, ShadowGate

DeviceRolloutStatus = Literal[
    "waiting",
    "shadow",
    "pending",
    "downloading",
    "verifying",
    "loading",
    "probation",
    "active",
    "failed",
    "rolled_back",
    "skipped",
]
_DONE = ("active", "failed")


class State(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"
    ROLLING_BACK = "rolling_back"
    # Abort takes back only what never served: shadow candidates this rollout set.
    ABORTING = "aborting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


class Phase(StrEnum):
    """Where the current wave is: its candidate in shadow beside the live model, or going live."""

    SHADOW = "shadow"
    LIVE = "live"


def shadow_tenant(tenant: str) -> str:
    """The agent runs an assignment for ``{tenant}.shadow`` as that tenant's shadow candidate."""
    return f"{tenant}{SHADOW_SUFFIX}"


ACTIVE_STATES = frozenset(
    {State.RUNNING, State.PAUSED, State.AWAITING_APPROVAL, State.ROLLING_BACK, State.ABORTING}
)


class Command(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    APPROVE = "approve"
    ABORT = "abort"
    ROLLBACK = "rollback"
    PROMOTE = "promote"


# (state, operator command) -> next state. Anything else is refused with the state named.
COMMANDS: dict[tuple[State, Command], State] = {
    (State.RUNNING, Command.PAUSE): State.PAUSED,
    (State.AWAITING_APPROVAL, Command.PAUSE): State.PAUSED,
    (State.PAUSED, Command.RESUME): State.RUNNING,
    (State.AWAITING_APPROVAL, Command.APPROVE): State.RUNNING,
    # Promote: the current wave counts as passed, its remaining soak and gates are skipped.
    (State.RUNNING, Command.PROMOTE): State.RUNNING,
    (State.PAUSED, Command.PROMOTE): State.RUNNING,
    (State.AWAITING_APPROVAL, Command.PROMOTE): State.RUNNING,
    (State.RUNNING, Command.ABORT): State.ABORTING,
    (State.PAUSED, Command.ABORT): State.ABORTING,
    (State.AWAITING_APPROVAL, Command.ABORT): State.ABORTING,
    **{
        (s, Command.ROLLBACK): State.ROLLING_BACK
        for s in (
            State.RUNNING,
            State.PAUSED,
            State.AWAITING_APPROVAL,
            State.ABORTING,
            State.SUCCEEDED,
            State.FAILED,
            State.ABORTED,
        )
    },
}


@dataclass(frozen=True)
class Member:
    device_id: str
    wave: int
    # What this device is sent (per device: the variant may differ between devices).
    wanted: fleet_pb2.ModelAssignment
    # The tenant's assignment before the rollout; None: the tenant had no model.
    previous: fleet_pb2.ModelAssignment | None
    # When this rollout set the device's desired state (None: not yet).
    set_at: float | None = None
    # When this rollout set the candidate as the tenant's shadow on the device (None: not yet).
    shadow_set_at: float | None = None

    def shadow(self) -> fleet_pb2.ModelAssignment:
        """The wanted assignment as the tenant's shadow candidate (no probation: it never serves)."""
        a = fleet_pb2.ModelAssignment()
        a.CopyFrom(self.wanted)
        a.tenant = shadow_tenant(tenant_or_default(self.wanted.tenant))
        a.probation_s = 0.0
        a.max_error_rate = 0.0
        return a


@dataclass(frozen=True)
class Run:
    """A rollout's persisted engine state."""

    id: str
    tenant: str
    plan: Plan
    state: State
    members: tuple[Member, ...]
    wave: int = -1
    soak_started_at: float | None = None
    promoted: bool = False
    approved_wave: int = 0
    reason: str = ""
    phase: Phase = Phase.LIVE


@dataclass(frozen=True)
class VersionStats:
    """A model version's inferences on one device, whatever fed them (tenant pipeline, gRPC)."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float = 0.0
    # Samples in the drift sketches' confidence histograms, and their mean top-class confidence.
    confidence_samples: int = 0
    confidence_mean: float = 0.0
    # Predicted-class counts from the same sketches; index i is class i.
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShadowView:
    """The candidate in shadow on one device since it was set there, summed over telemetry windows."""

    compared: int = 0
    # Means over the windows, weighted by their compared samples.
    top1_agreement: float = 0.0
    mean_abs_deviation: float = 0.0


@dataclass(frozen=True)
class DeviceView:
    """One member device as the controller knows it now."""

    device_id: str
    online: bool
    desired_generation: int
    desired: fleet_pb2.DesiredState | None
    # Where the device is with the wanted artifact, from its reported state.
    status: DeviceRolloutStatus = "pending"
    detail: str = ""
    # The new version since the device was set; the previous version before that.
    new: VersionStats = VersionStats()
    baseline: VersionStats = VersionStats()
    # Where the device is with the candidate as the tenant's shadow, and how it compared.
    shadow_status: DeviceRolloutStatus = "pending"
    shadow: ShadowView = ShadowView()
    # The candidate's own inferences in the shadow lane since it was set there.
    shadow_stats: VersionStats = VersionStats()
    # Whether the device's maintenance windows let the rollout send it something now.
    window: WindowStatus = ALWAYS


class Action(StrEnum):
    """What a planned step does; each has one executor (controller.rollout_executor.EXECUTORS)
    but WAIT, which the runner only sleeps on. The values are written to the rollout's events."""

    SET_DESIRED = "set_desired"
    START_WAVE = "start_wave"
    START_SOAK = "start_soak"
    GO_LIVE = "go_live"
    PAUSE = "pause"
    AWAIT_APPROVAL = "await_approval"
    ROLL_BACK = "roll_back"
    COMPLETE = "complete"
    WAIT = "wait"


@dataclass(frozen=True)
class Step:
    action: ClassVar[Action]


@dataclass(frozen=True)
class SetDesired(Step):
    action: ClassVar[Action] = Action.SET_DESIRED
    device_id: str
    desired: fleet_pb2.DesiredState
    revert: bool
    reason: str
    # Sets the candidate as the tenant's shadow (the member's shadow_set_at, not its set_at).
    shadow: bool = False


@dataclass(frozen=True)
class StartWave(Step):
    action: ClassVar[Action] = Action.START_WAVE
    wave: int
    reason: str


@dataclass(frozen=True)
class StartSoak(Step):
    action: ClassVar[Action] = Action.START_SOAK
    wave: int
    reason: str


@dataclass(frozen=True)
class GoLive(Step):
    """The wave's shadow phase is over (its gate passed, or the operator promoted): send it live."""

    action: ClassVar[Action] = Action.GO_LIVE
    wave: int
    reason: str


@dataclass(frozen=True)
class Pause(Step):
    action: ClassVar[Action] = Action.PAUSE
    reason: str


@dataclass(frozen=True)
class AwaitApproval(Step):
    action: ClassVar[Action] = Action.AWAIT_APPROVAL
    wave: int
    reason: str


@dataclass(frozen=True)
class RollBack(Step):
    action: ClassVar[Action] = Action.ROLL_BACK
    reason: str


@dataclass(frozen=True)
class Complete(Step):
    action: ClassVar[Action] = Action.COMPLETE
    state: State
    reason: str


@dataclass(frozen=True)
class Wait(Step):
    action: ClassVar[Action] = Action.WAIT
    until: float
    reason: str


@dataclass(frozen=True)
class WaveVerdict:
    failure: str | None
    settled: bool
    deadline: float
    failed: int
    reporting: int
    size: int


def carries(desired: fleet_pb2.DesiredState | None, assignment: fleet_pb2.ModelAssignment) -> bool:
    return desired is not None and any(m == assignment for m in desired.models)


def desired_with(
    view: DeviceView,
    tenant: str,
    assignment: fleet_pb2.ModelAssignment | None,
    now: float,
    *more: tuple[str, fleet_pb2.ModelAssignment | None],
) -> fleet_pb2.DesiredState:
    """The device's next desired state: the same, with ``tenant`` set to ``assignment`` (or removed),
    and likewise each further ``(tenant, assignment)``."""
    changes = dict([(tenant, assignment), *more])
    current = list(view.desired.models) if view.desired is not None else []
    models = [m for m in current if tenant_or_default(m.tenant) not in changes]
    models += [a for a in changes.values() if a is not None]
    return fleet_pb2.DesiredState(
        device_id=view.device_id,
        generation=view.desired_generation + 1,
        models=sorted(models, key=lambda m: m.tenant),
        issued_at_ms=int(now * 1000),
        tenants=view.desired.tenants if view.desired is not None else [],
    )


def _tally(
    loads: Sequence[tuple[DeviceRolloutStatus, float | None, bool]], timeout: float | None, now: float
) -> WaveVerdict:
    """Count a wave's devices from (status, when the assignment was set, online): done, failed,
    or still on their way, and when the first of those times out. No gate is judged here."""
    failed = reporting = 0
    settled = True
    deadline = math.inf
    for status, set_at, online in loads:
        if status in _DONE:
            reporting += 1
            failed += status == "failed"
            continue
        if set_at is None:
            settled = False
            continue
        timeout_at = set_at + timeout if timeout is not None else math.inf
        if now >= timeout_at:
            # Online but silent about its update: a failure. Offline: only not reporting.
            failed += online
            continue
        settled = False
        deadline = min(deadline, timeout_at)
    return WaveVerdict(None, settled, deadline, failed, reporting, len(loads))


def judge(run: Run, members: Sequence[Member], fleet: Mapping[str, DeviceView], now: float) -> WaveVerdict:
    """Where one wave stands: settled or not, and the first gate it fails, if any."""
    gates = run.plan.gates
    loads = [(fleet[m.device_id].status, m.set_at, fleet[m.device_id].online) for m in members]
    verdict = _tally(loads, run.plan.device_timeout_s, now)
    failed, n, settled = verdict.failed, verdict.size, verdict.settled
    if not n or run.promoted:
        return verdict
    if failed / n > gates.max_failure_fraction:
        return _fail(
            verdict, f"{failed} of {n} devices failed to update (limit {gates.max_failure_fraction:g})"
        )
    views = [fleet[m.device_id] for m in members]
    judged = [v for v in views if v.new.inferences >= gates.min_inferences]
    failure = _error_rate(gates, [v.new for v in views], "inferences")
    if failure:
        return _fail(verdict, failure)
    ratios = _latency_ratios(judged)
    # Latency and confidence wait until every device settled: while a wave updates, devices
    # busy downloading and loading answer slower for reasons that are not the new model's.
    if gates.max_latency_ratio is not None and ratios and settled:
        ratio = statistics.median(ratios)
        if ratio > gates.max_latency_ratio:
            return _fail(
                verdict,
                f"p95 latency {ratio:.2f}x the previous version on the same devices "
                f"(median of {len(ratios)} devices) exceeds {gates.max_latency_ratio:g}x",
            )
    if gates.min_confidence_ratio is not None and settled:
        failure = _confidence_gate(views, gates.min_inferences, gates.min_confidence_ratio)
        if failure:
            return _fail(verdict, failure)
    if gates.max_prediction_psi is not None and settled:
        failure = _prediction_gate(views, gates.min_inferences, gates.max_prediction_psi)
        if failure:
            return _fail(verdict, failure)
    return verdict


def _latency_ratios(judged: Sequence[DeviceView]) -> list[float]:
    """p95 of the new version over the previous one's, per device that measured both."""
    return [v.new.p95_ms / v.baseline.p95_ms for v in judged if v.baseline.p95_ms > 0 and v.new.p95_ms > 0]


def gate_figures(gates: Gates, views: Sequence[DeviceView]) -> str:
    """What a wave's gates measured, for the verdict of a wave that passed them."""
    failed = sum(v.status == "failed" for v in views)
    parts = [f"{failed} of {len(views)} devices failed"]
    judged = [v for v in views if v.new.inferences >= gates.min_inferences]
    if gates.max_error_rate is not None and judged:
        inferences = sum(v.new.inferences for v in judged)
        errors = sum(v.new.errors for v in judged)
        parts.append(f"error rate {errors / inferences:.3f} ({errors}/{inferences} inferences)")
    ratios = _latency_ratios(judged)
    if gates.max_latency_ratio is not None and ratios:
        parts.append(f"p95 latency {statistics.median(ratios):.2f}x the previous version")
    if reads_inferences(gates):
        parts.append(f"{len(judged)} devices judged")
    return ", ".join(parts)


def _error_rate(gates: Gates, stats: Sequence[VersionStats], what: str) -> str | None:
    """The error-rate gate over the devices with at least ``min_inferences``: every inference
    the version made there counts, whatever fed it."""
    judged = [s for s in stats if s.inferences >= gates.min_inferences]
    if gates.max_error_rate is None or not judged:
        return None
    inferences = sum(s.inferences for s in judged)
    errors = sum(s.errors for s in judged)
    if errors / inferences <= gates.max_error_rate:
        return None
    return (
        f"error rate {errors / inferences:.3f} ({errors}/{inferences} {what} on "
        f"{len(judged)} devices) exceeds {gates.max_error_rate:g}"
    )


def _prediction_gate(views: Sequence[DeviceView], min_samples: int, max_psi: float) -> str | None:
    paired = [v for v in views if sum(v.new.classes) >= min_samples and sum(v.baseline.classes) > 0]
    if not paired:
        return None
    size = max(len(c) for v in paired for c in (v.new.classes, v.baseline.classes))
    new = [sum(v.new.classes[i] if i < len(v.new.classes) else 0 for v in paired) for i in range(size)]
    old = [
        sum(v.baseline.classes[i] if i < len(v.baseline.classes) else 0 for v in paired) for i in range(size)
    ]
    value = drift.psi(old, new)
    if value <= max_psi:
        return None
    return (
        f"predicted-class PSI {value:.3f} against the previous version on the same {len(paired)} devices "
        f"exceeds {max_psi:g}"
    )


def _confidence_gate(views: Sequence[DeviceView], min_samples: int, min_ratio: float) -> str | None:
    paired = [v for v in views if v.new.confidence_samples >= min_samples and v.baseline.confidence_samples]
    if not paired:
        return None
    new = sum(v.new.confidence_mean * v.new.confidence_samples for v in paired)
    new /= sum(v.new.confidence_samples for v in paired)
    old = sum(v.baseline.confidence_mean * v.baseline.confidence_samples for v in paired)
    old /= sum(v.baseline.confidence_samples for v in paired)
    if old <= 0 or new / old >= min_ratio:
        return None
    return (
        f"mean confidence {new:.3f} is {new / old:.2f}x the previous version's {old:.3f} on the same "
        f"{len(paired)} devices (limit {min_ratio:g}x)"
    )


def _fail(verdict: WaveVerdict, reason: str) -> WaveVerdict:
    return WaveVerdict(
        reason, verdict.settled, verdict.deadline, verdict.failed, verdict.reporting, verdict.size
    )


def plan(run: Run, fleet: Mapping[str, DeviceView], now: float) -> list[Step]:
    if run.state is State.ROLLING_BACK:
        return _rollback_steps(run, fleet, now)
    if run.state is State.ABORTING:
        return _abort_steps(run, fleet, now)
    if run.state is State.PAUSED:
        return [Wait(math.inf, f"paused: {run.reason}")]
    if run.state is State.AWAITING_APPROVAL:
        return [Wait(math.inf, f"wave {run.wave + 2} awaits approval")]
    if run.state is not State.RUNNING:
        return []
    if run.wave < 0:
        if run.plan.start_at is not None and now < run.plan.start_at:
            return [Wait(run.plan.start_at, f"scheduled to start at {iso_time(run.plan.start_at)}")]
        return [StartWave(0, "rollout started")]
    last = len(run.plan.waves) - 1
    label = f"wave {run.wave + 1} of {last + 1}"
    members = [m for m in run.members if m.wave == run.wave]
    if run.phase is Phase.SHADOW and run.plan.shadow is not None:
        return _shadow_steps(run, members, fleet, now, label)
    verdict = judge(run, members, fleet, now)
    if verdict.failure is not None:
        return [_on_failure(run, f"{label}: {verdict.failure}")]
    sets = _set_steps(run, members, fleet, now, label)
    if sets:
        return sets
    if not verdict.settled:
        return [_updating(members, fleet, verdict.deadline, f"{label}: devices updating")]
    if run.soak_started_at is None:
        return [StartSoak(run.wave, f"{label}: {verdict.reporting} of {verdict.size} devices reported")]
    soak_end = run.soak_started_at + run.plan.waves[run.wave].soak_s
    if now < soak_end and not run.promoted:
        return [Wait(soak_end, f"{label}: soaking")]
    gates = run.plan.gates
    if not run.promoted and verdict.size and verdict.reporting / verdict.size < gates.min_reporting_fraction:
        reason = (
            f"{label}: only {verdict.reporting} of {verdict.size} devices reported "
            f"(need {gates.min_reporting_fraction:g})"
        )
        return [_on_failure(run, reason)]
    if not run.promoted:
        missing = _missing_evidence(run, members, fleet, now, label)
        if missing is not None:
            return [missing]
    figures = gate_figures(gates, [fleet[m.device_id] for m in members])
    if run.wave == last:
        failed = sum(fleet[m.device_id].status == "failed" for m in run.members)
        if failed:
            return [Complete(State.FAILED, f"{label} done; {failed} of {len(run.members)} devices failed")]
        return [
            Complete(State.SUCCEEDED, f"{label} done ({figures}); all {len(run.members)} devices updated")
        ]
    if run.plan.manual_approval and run.approved_wave <= run.wave and not run.promoted:
        return [
            AwaitApproval(
                run.wave, f"{label} passed its gates ({figures}); wave {run.wave + 2} awaits approval"
            )
        ]
    why = "promoted by the operator" if run.promoted else f"passed its gates ({figures})"
    return [StartWave(run.wave + 1, f"{label} {why}")]


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _updating(
    members: Sequence[Member], fleet: Mapping[str, DeviceView], deadline: float, reason: str
) -> Wait:
    """Waiting on a wave's devices; those outside their maintenance window wait for it to open."""
    closed = [fleet[m.device_id].window for m in members if not fleet[m.device_id].window.open]
    if not closed:
        return Wait(deadline, reason)
    opens = min(w.opens_at for w in closed)
    return Wait(min(deadline, opens), f"{reason}; {len(closed)} waiting for their maintenance window")


def reads_inferences(gates: Gates) -> bool:
    """Whether any gate judges the new version's inferences (and so needs ``min_inferences`` of them)."""
    return any(
        g is not None
        for g in (
            gates.max_error_rate,
            gates.max_latency_ratio,
            gates.min_confidence_ratio,
            gates.max_prediction_psi,
        )
    )


def _missing_evidence(
    run: Run, members: Sequence[Member], fleet: Mapping[str, DeviceView], now: float, label: str
) -> Step | None:
    """A wave whose gates read inferences passes only once they have judged enough of it: at least
    one device, and ``min_reporting_fraction`` of those serving the new version, made
    ``min_inferences`` of it. Gates that judged nobody have not passed; the wave waits for that
    evidence at most ``device_timeout_s`` from the moment its devices had all updated (its soak
    began), then stops: a device idle, starved or offline is no proof that the version works.
    Counted from then, not from sending, so a slow download does not eat the time to prove it."""
    gates = run.plan.gates
    if not members or not reads_inferences(gates):
        return None
    serving = [fleet[m.device_id] for m in members if fleet[m.device_id].status == "active"]
    judged = sum(v.new.inferences >= gates.min_inferences for v in serving)
    needed = max(1, math.ceil(gates.min_reporting_fraction * len(serving)))
    if judged >= needed:
        return None
    wanted = members[0].wanted
    what = f"{judged} of {len(serving)} devices reported {gates.min_inferences} inferences of "
    what += f"{wanted.model_name} {wanted.model_version}"
    timeout = run.plan.device_timeout_s
    if timeout is None:
        return Wait(math.inf, f"{label}: waiting for evidence: {what} (need {needed})")
    bound = (run.soak_started_at if run.soak_started_at is not None else now) + timeout
    if now < bound:
        return Wait(bound, f"{label}: waiting for evidence: {what} (need {needed})")
    return _on_failure(run, f"{label}: only {what} within {timeout:g} s of updating (need {needed})")


def _on_failure(run: Run, reason: str) -> Step:
    return RollBack(reason) if run.plan.failure_action is FailureAction.ROLLBACK else Pause(reason)


def _limit(
    run: Run,
    todo: list[Member],
    busy_members: Sequence[tuple[float, DeviceView, DeviceRolloutStatus]],
    now: float,
) -> list[Member]:
    """At most ``max_concurrent`` devices updating at once; ``busy_members`` are (set at, view, status)."""
    if not run.plan.max_concurrent:
        return todo
    timeout = run.plan.device_timeout_s
    busy = sum(
        1
        for set_at, view, status in busy_members
        # An offline device downloads nothing: it does not hold a slot.
        if view.online and status not in _DONE and (timeout is None or now < set_at + timeout)
    )
    return todo[: max(0, run.plan.max_concurrent - busy)]


def _set_steps(
    run: Run, members: Sequence[Member], fleet: Mapping[str, DeviceView], now: float, label: str
) -> list[Step]:
    # A device outside its maintenance window is not sent anything until the window opens.
    todo = [
        m
        for m in members
        if m.set_at is None
        and not carries(fleet[m.device_id].desired, m.wanted)
        and fleet[m.device_id].window.open
    ]
    busy = [
        (m.set_at, fleet[m.device_id], fleet[m.device_id].status) for m in members if m.set_at is not None
    ]
    # Going live ends the shadow phase: the candidate leaves the shadow slot in the same desired state.
    clear = (shadow_tenant(run.tenant), None) if run.plan.shadow is not None else None
    return [
        SetDesired(
            m.device_id,
            desired_with(fleet[m.device_id], run.tenant, m.wanted, now, *([clear] if clear else [])),
            revert=False,
            reason=f"{label}: send {m.wanted.model_name} {m.wanted.model_version}",
        )
        for m in _limit(run, todo, busy, now)
    ]


def _shadow_steps(
    run: Run, members: Sequence[Member], fleet: Mapping[str, DeviceView], now: float, label: str
) -> list[Step]:
    """A wave's shadow phase: set the candidate as ``{tenant}.shadow``, wait, soak, judge, go live."""
    gate = run.plan.shadow
    assert gate is not None
    if not members:
        return [GoLive(run.wave, f"{label}: no devices in this wave")]
    if run.promoted:
        return [GoLive(run.wave, f"{label}: promoted by the operator; shadow gate skipped")]
    verdict = _judge_shadow_loading(run, members, fleet, now)
    if verdict.failure is not None:
        return [_on_failure(run, f"{label}: shadow: {verdict.failure}")]
    # Judged continuously, like a live wave's: a candidate that fails in the shadow lane stops early.
    failure = _error_rate(
        run.plan.gates, [fleet[m.device_id].shadow_stats for m in members], "shadow inferences"
    )
    if failure:
        return [_on_failure(run, f"{label}: shadow: {failure}; nothing went live")]
    todo = [
        m
        for m in members
        if m.shadow_set_at is None
        and not carries(fleet[m.device_id].desired, m.shadow())
        and fleet[m.device_id].window.open
    ]
    busy = [
        (m.shadow_set_at, fleet[m.device_id], fleet[m.device_id].shadow_status)
        for m in members
        if m.shadow_set_at is not None
    ]
    sets: list[Step] = [
        SetDesired(
            m.device_id,
            desired_with(fleet[m.device_id], shadow_tenant(run.tenant), m.shadow(), now),
            revert=False,
            reason=f"{label}: {m.wanted.model_name} {m.wanted.model_version} in shadow beside the live model",
            shadow=True,
        )
        for m in _limit(run, todo, busy, now)
    ]
    if sets:
        return sets
    if not verdict.settled:
        return [_updating(members, fleet, verdict.deadline, f"{label}: shadow candidates loading")]
    if run.soak_started_at is None:
        return [
            StartSoak(
                run.wave,
                f"{label}: shadow soak; candidate loaded on {verdict.reporting} of {verdict.size} devices",
            )
        ]
    soak_end = run.soak_started_at + gate.soak_s
    if now < soak_end:
        return [Wait(soak_end, f"{label}: shadow soaking")]
    views = [fleet[m.device_id] for m in members]
    failure, summary = shadow_gate(gate, views, run.plan.gates.min_reporting_fraction)
    if failure is not None:
        return [_on_failure(run, f"{label}: shadow gate: {failure}; nothing went live")]
    return [GoLive(run.wave, f"{label}: shadow gate passed ({summary}); going live")]


def _judge_shadow_loading(
    run: Run, members: Sequence[Member], fleet: Mapping[str, DeviceView], now: float
) -> WaveVerdict:
    """Like :func:`judge` for the shadow assignments: loaded, failed, or still on their way."""
    loads = [(fleet[m.device_id].shadow_status, m.shadow_set_at, fleet[m.device_id].online) for m in members]
    verdict = _tally(loads, run.plan.device_timeout_s, now)
    failed, n = verdict.failed, verdict.size
    limit = run.plan.gates.max_failure_fraction
    if n and failed / n > limit:
        return _fail(verdict, f"{failed} of {n} devices could not load the candidate (limit {limit:g})")
    return verdict


def shadow_gate(
    gate: ShadowGate, views: Sequence[DeviceView], min_reporting: float
) -> tuple[str | None, str]:
    """(the failure or None, a summary) of a wave's shadow comparison.

    Devices with fewer than ``min_compared`` samples do not count towards the means and
    count against ``min_reporting``; a wave where no device compared enough never passes.
    """
    n = len(views)
    counted = [v.shadow for v in views if v.shadow.compared >= gate.min_compared]
    if not counted:
        most = max((v.shadow.compared for v in views), default=0)
        return f"no device compared {gate.min_compared} samples (most: {most})", ""
    if len(counted) / n < min_reporting:
        return (
            f"only {len(counted)} of {n} devices compared {gate.min_compared} samples (need {min_reporting:g})",
            "",
        )
    compared = sum(s.compared for s in counted)
    agreement = sum(s.top1_agreement * s.compared for s in counted) / compared
    deviation = sum(s.mean_abs_deviation * s.compared for s in counted) / compared
    where = f"{compared} samples compared on {len(counted)} of {n} devices"
    if gate.min_agreement is not None and agreement < gate.min_agreement:
        return (
            f"top-1 agreement with the live model {agreement:.3f} ({where}) is below {gate.min_agreement:g}",
            "",
        )
    if gate.max_deviation is not None and deviation > gate.max_deviation:
        return (
            f"mean deviation from the live model {deviation:.4g} ({where}) exceeds {gate.max_deviation:g}",
            "",
        )
    return None, f"top-1 agreement {agreement:.3f}, mean deviation {deviation:.4g}, {where}"


def _abort_steps(run: Run, fleet: Mapping[str, DeviceView], now: float) -> list[Step]:
    """Abort leaves every live assignment where it is, but a shadow candidate left
    behind would keep costing the device CPU for a rollout that no longer judges it."""
    steps: list[Step] = []
    if run.plan.shadow is not None:
        for m in run.members:
            view = fleet[m.device_id]
            if carries(view.desired, m.shadow()):
                steps.append(
                    SetDesired(
                        m.device_id,
                        desired_with(view, shadow_tenant(run.tenant), None, now),
                        revert=True,
                        reason="aborted: shadow candidate cleared; live model left as it is",
                    )
                )
    if steps:
        return steps
    return [Complete(State.ABORTED, run.reason or "aborted")]


def _rollback_steps(run: Run, fleet: Mapping[str, DeviceView], now: float) -> list[Step]:
    steps: list[Step] = []
    for m in run.members:
        view = fleet[m.device_id]
        changes: list[tuple[str, fleet_pb2.ModelAssignment | None]] = []
        reasons = []
        if carries(view.desired, m.wanted):
            changes.append((run.tenant, m.previous))
            back = f"{m.previous.model_name} {m.previous.model_version}" if m.previous else "no model"
            reasons.append(f"back to {back}")
        if run.plan.shadow is not None and carries(view.desired, m.shadow()):
            changes.append((shadow_tenant(run.tenant), None))
            reasons.append("shadow candidate cleared")
        if not changes:
            continue
        steps.append(
            SetDesired(
                m.device_id,
                desired_with(view, *changes[0], now, *changes[1:]),
                revert=True,
                reason="; ".join(reasons),
            )
        )
    if steps:
        return steps
    touched = sum(m.set_at is not None or m.shadow_set_at is not None for m in run.members)
    restored = f"desired state restored on the {touched} devices this rollout touched"
    return [Complete(State.ROLLED_BACK, f"{run.reason}; {restored}" if run.reason else restored)]
