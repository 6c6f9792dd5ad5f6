"""The pure planner of the agent: what to do next to move towards the desired state.

``plan(desired, current, now) -> list[Step]`` looks at the desired state, what is
on disk and in flight (:class:`Current`) and the monotonic clock, and returns
frozen steps. The executor (:mod:`agent.updater`) maps each step's ``action`` to
the function that performs it; the service loop plans, executes, plans again.
An empty plan means converged; a plan of only :class:`Wait` steps means nothing
can happen before the deadline or an inbound message. No I/O in this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from agent.artifacts import FORMATS, valid_digest
from agent.broadcast import reception
from agent.compat import StrEnum
from agent.conditions import Condition
from agent.runtime import DEFAULT_RUNTIME_FOR_FORMAT
from agent.state import Assignment, Desired, DeviceState, TenantState, Update
from agent.update_machine import OUTCOMES, SERVING_NEW, UpdateEvent, UpdateState, judge_probation

# Progress-only changes of the reported state are published at most this often.
PROGRESS_REPORT_INTERVAL_S = 1.0
# How often a model on probation has its error rate looked at.
PROBATION_POLL_S = 0.25
# The most chunk indices the controller serves for one ChunkRequest.
MAX_INDICES_PER_REQUEST = 64


class Action(StrEnum):
    REPORT = "report"
    FAIL = "fail"
    ACTIVATE = "activate"
    VERIFY = "verify"
    REQUEST_MANIFEST = "request_manifest"
    REQUEST_CHUNKS = "request_chunks"
    LISTEN = "listen"
    DEACTIVATE = "deactivate"
    MARK_APPLIED = "mark_applied"
    COLLECT_GARBAGE = "collect_garbage"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    WAIT = "wait"


class Phase(StrEnum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVE = "active"
    FAILED = "failed"
    PROBATION = "probation"


@dataclass(frozen=True)
class ModelEntry:
    tenant: str
    model_name: str
    model_version: str
    digest: str
    phase: Phase
    bytes_have: int = 0
    bytes_total: int = 0
    error: str = ""
    rollout_id: str = ""
    # "succeeded", "failed" or "rolled_back" once the update ended; the machine's state.
    outcome: str = ""
    update_state: str = ""


@dataclass(frozen=True)
class Report:
    desired_generation: int
    applied_generation: int
    models: tuple[ModelEntry, ...]
    conditions: tuple[Condition, ...] = ()

    def structure(self) -> Report:
        """The report without byte counts, nor the latest message and count of each condition:
        what must be published without delay. A condition hit again and again (a flood of
        refused desired states, say) is published at most once a progress interval."""
        return replace(
            self,
            models=tuple(replace(m, bytes_have=0) for m in self.models),
            conditions=tuple(replace(c, message="", count=0) for c in self.conditions),
        )


@dataclass(frozen=True)
class TransferView:
    """One artifact transfer: what is on disk and what is asked for."""

    digest: str
    has_manifest: bool = False
    manifest_requested_at: float | None = None
    chunks: int = 0
    have: frozenset[int] = frozenset()
    outstanding: Mapping[int, float] = field(default_factory=dict)
    bytes_have: int = 0
    bytes_total: int = 0
    # Subscribed to the artifact's wave broadcast; nothing is asked for before this time while
    # the broadcast may still bring it (-inf: it ended, or went quiet for a request timeout).
    listening: bool = False
    broadcast_until: float = -math.inf

    @property
    def complete(self) -> bool:
        return self.has_manifest and len(self.have) == self.chunks


@dataclass(frozen=True)
class Current:
    state: DeviceState
    installed: frozenset[str] = frozenset()
    transfers: Mapping[str, TransferView] = field(default_factory=dict)
    connected: bool = True
    runtimes: frozenset[str] = frozenset({"onnxruntime"})
    reported: Report | None = None
    reported_at: float = -math.inf
    window: int = 8
    request_timeout_s: float = 5.0
    # (inferences, errors) since start of each tenant's serving model version.
    probes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # What keeps the device from its work (a full disk), reported as it changes.
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Step:
    action: ClassVar[Action]


@dataclass(frozen=True)
class ReportState(Step):
    action: ClassVar[Action] = Action.REPORT
    report: Report


@dataclass(frozen=True)
class Fail(Step):
    action: ClassVar[Action] = Action.FAIL
    assignment: Assignment
    reason: str


@dataclass(frozen=True)
class Activate(Step):
    action: ClassVar[Action] = Action.ACTIVATE
    assignment: Assignment


@dataclass(frozen=True)
class Verify(Step):
    action: ClassVar[Action] = Action.VERIFY
    digest: str


@dataclass(frozen=True)
class RequestManifest(Step):
    action: ClassVar[Action] = Action.REQUEST_MANIFEST
    assignment: Assignment
    # The assignment's sample inputs rather than its model.
    sample: bool = False

    @property
    def digest(self) -> str:
        return self.assignment.sample_digest if self.sample else self.assignment.digest


@dataclass(frozen=True)
class Listen(Step):
    """Take the artifact (or the sample inputs) of ``assignment`` from its wave broadcast."""

    action: ClassVar[Action] = Action.LISTEN
    assignment: Assignment
    sample: bool = False

    @property
    def digest(self) -> str:
        return self.assignment.sample_digest if self.sample else self.assignment.digest


@dataclass(frozen=True)
class RequestChunks(Step):
    action: ClassVar[Action] = Action.REQUEST_CHUNKS
    digest: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Deactivate(Step):
    action: ClassVar[Action] = Action.DEACTIVATE
    tenant: str


@dataclass(frozen=True)
class MarkApplied(Step):
    action: ClassVar[Action] = Action.MARK_APPLIED
    generation: int


@dataclass(frozen=True)
class CollectGarbage(Step):
    action: ClassVar[Action] = Action.COLLECT_GARBAGE
    digests: tuple[str, ...]


@dataclass(frozen=True)
class Commit(Step):
    action: ClassVar[Action] = Action.COMMIT
    tenant: str
    reason: str


@dataclass(frozen=True)
class RollBack(Step):
    action: ClassVar[Action] = Action.ROLLBACK
    tenant: str
    reason: str
    # Why: the probation failed (or was interrupted), or a newer desired version superseded it.
    cause: UpdateEvent = UpdateEvent.PROBATION_FAILED


@dataclass(frozen=True)
class Wait(Step):
    action: ClassVar[Action] = Action.WAIT
    until: float
    reason: str


def failure_reason(desired: Desired, current: Current, a: Assignment) -> str | None:
    """Why this assignment cannot be applied in this generation, if it cannot."""
    failure = current.state.failures.get(a.digest)
    if failure is not None and failure.generation >= desired.generation:
        return failure.reason
    return None


def pieces(a: Assignment) -> tuple[tuple[str, bool], ...]:
    """What must be on disk before ``a`` stages: its model, and its sample inputs if it has any."""
    return ((a.digest, False), (a.sample_digest, True)) if a.sample_digest else ((a.digest, False),)


def precheck(a: Assignment, runtimes: frozenset[str]) -> str | None:
    if not valid_digest(a.digest):
        return f"artifact digest {a.digest!r} is not a lowercase hex sha256"
    if a.sample_digest and not valid_digest(a.sample_digest):
        return f"sample digest {a.sample_digest!r} is not a lowercase hex sha256"
    if a.format not in FORMATS:
        return f"artifact format {a.format!r} is not one of {', '.join(FORMATS)}"
    runtime = a.runtime or DEFAULT_RUNTIME_FOR_FORMAT.get(a.format, "")
    if runtime not in runtimes:
        return f"runtime {runtime!r} is not available on this device (have {', '.join(sorted(runtimes))})"
    return None


def build_report(desired: Desired | None, current: Current) -> Report:
    entries: list[ModelEntry] = []
    state = current.state
    tenants = sorted(set(state.tenants) | {a.tenant for a in (desired.assignments if desired else ())})
    for tenant in tenants:
        ts = state.tenants.get(tenant)
        active = ts.active if ts else None
        update = _update_for(state, tenant, active.assignment.digest if active else "")
        if active is not None:
            a = active.assignment
            machine = update.state if update else None
            entries.append(
                ModelEntry(
                    tenant,
                    a.model_name,
                    a.model_version,
                    a.digest,
                    Phase.PROBATION if machine in SERVING_NEW else Phase.ACTIVE,
                    a.size,
                    a.size,
                    "",
                    a.rollout_id,
                    OUTCOMES.get(machine, "") if machine else "",
                    machine.value if machine else "",
                )
            )
        want = desired.for_tenant(tenant) if desired else None
        if want is None or (active is not None and active.assignment.digest == want.digest):
            continue
        entries.append(_pending_entry(desired, current, want))
    return Report(
        desired_generation=state.desired_generation,
        applied_generation=state.applied_generation,
        models=tuple(entries),
        conditions=current.conditions,
    )


def _pending_entry(desired: Desired | None, current: Current, a: Assignment) -> ModelEntry:
    # The model and its sample inputs count as one download.
    total = have = 0
    complete = True
    for digest, sample in pieces(a):
        transfer = current.transfers.get(digest)
        size = (
            transfer.bytes_total if transfer and transfer.bytes_total else a.sample_size if sample else a.size
        )
        total += size
        if digest in current.installed:
            have += size
        else:
            have += transfer.bytes_have if transfer else 0
            complete = complete and transfer is not None and transfer.complete
    error = failure_reason(desired, current, a) if desired else None
    error = error or precheck(a, current.runtimes)
    if error is not None:
        phase = Phase.FAILED
    elif all(digest in current.installed for digest, _ in pieces(a)):
        phase, have = Phase.LOADING, total
    elif complete:
        phase, have = Phase.VERIFYING, total
    else:
        phase = Phase.DOWNLOADING
    update = _update_for(current.state, a.tenant, a.digest)
    machine = update.state if update else None
    outcome = ""
    if phase is Phase.FAILED:
        outcome = "rolled_back" if machine == UpdateState.ROLLED_BACK else "failed"
    return ModelEntry(
        a.tenant,
        a.model_name,
        a.model_version,
        a.digest,
        phase,
        have,
        total,
        error or "",
        a.rollout_id,
        outcome,
        machine.value if machine is not None else "",
    )


def _update_for(state: DeviceState, tenant: str, digest: str) -> Update | None:
    update = state.updates.get(tenant)
    return update if update is not None and update.assignment.digest == digest else None


def superseded_reason(desired: Desired, want: Assignment, ts: TenantState) -> str:
    back = ts.previous is not None and ts.previous.assignment.digest == want.digest
    newer = f"{want.model_name} {want.model_version} (desired generation {desired.generation})"
    return f"the controller rolled back to {newer}" if back else f"superseded by {newer}"


def _machine_steps(want: Assignment, desired: Desired, current: Current, now: float) -> list[Step] | None:
    """What the update state machine needs of the model the tenant of ``want`` serves; None: nothing.

    When ``want`` is another artifact, an update on probation is rolled back before
    the newer one starts, so that one's rollback target is the last committed model,
    never a version that has not proved itself.
    """
    ts = current.state.tenants.get(want.tenant)
    if ts is None or ts.active is None:
        return None
    a = ts.active.assignment
    update = _update_for(current.state, a.tenant, a.digest)
    if update is None:
        return None
    machine = update.state
    if machine is UpdateState.COMMIT:
        return [Commit(a.tenant, "resuming the commit")]
    if machine in (UpdateState.ACTIVATE, UpdateState.ROLLBACK):
        # Interrupted by an error between the swap and probation, or while rolling back.
        return [RollBack(a.tenant, update.reason or f"interrupted in {machine.value}", UpdateEvent.ERROR)]
    if machine is not UpdateState.PROBATION:
        return None
    if want.digest != a.digest:
        return [RollBack(a.tenant, superseded_reason(desired, want, ts), UpdateEvent.SUPERSEDED)]
    if want != a:
        # The same artifact assigned anew (e.g. another rollout): activating it restarts the probation.
        return None
    inferences, errors = current.probes.get(a.tenant, (0, 0))
    event, why = judge_probation(
        inferences - update.base_inferences,
        errors - update.base_errors,
        # No probation was asked for (a shadow candidate, a plan without one): whatever its first
        # inferences did before this check is for the controller's gates to judge. Judging them
        # here would fail it on a busy device (inferences came first) and pass it on an idle one.
        a.max_error_rate if a.probation_s > 0 else math.inf,
        now,
        update.probation_until,
    )
    if event is UpdateEvent.PROBATION_FAILED:
        return [RollBack(a.tenant, why)]
    if event is UpdateEvent.PROBATION_PASSED:
        return [Commit(a.tenant, why)]
    return [Wait(min(update.probation_until, now + PROBATION_POLL_S), f"probation of {a.digest[:12]}")]


def chunk_requests(candidates: Sequence[int], free: int, window: int) -> list[tuple[int, ...]]:
    """The chunk requests to send now: none until half the window is free, then every free slot.

    A request costs the controller's network thread about what a chunk reply costs (a
    PUBLISH and its PUBACK), so asking for one chunk as each arrives nearly doubles its
    packets per chunk. Waiting for half the window keeps chunks flowing while each
    request carries several indices. The last chunks an artifact lacks are asked for
    as soon as they all fit, and a chunk whose request timed out is one of the
    candidates again (lowest index first, so it goes out with the next batch).
    """
    count = min(free, len(candidates))
    if count == 0 or count < min((window + 1) // 2, len(candidates)):
        return []
    batch = tuple(candidates[:count])
    return [batch[i : i + MAX_INDICES_PER_REQUEST] for i in range(0, count, MAX_INDICES_PER_REQUEST)]


@dataclass(frozen=True)
class _ChunkDemand:
    """An artifact whose chunks are to be asked for: where its requests go in the plan."""

    position: int
    digest: str
    candidates: list[int]
    in_flight: int


def _transfer_steps(
    a: Assignment, current: Current, now: float, sample: bool = False
) -> tuple[list[Step], tuple[list[int], int] | None]:
    """The steps of one artifact's transfer, and the chunks it lacks with its requests in flight
    when it is at the chunk stage: the plan shares the window between those afterwards."""
    if not current.connected:
        return [Wait(math.inf, "broker disconnected")], None
    digest = a.sample_digest if sample else a.digest
    t = current.transfers.get(digest)
    timeout = current.request_timeout_s
    if reception(a, sample) is not None:
        # By the wave's broadcast first; what it did not bring is asked for once it ended or went quiet.
        if t is None or not t.listening:
            return [Listen(a, sample)], None
        if now < t.broadcast_until:
            return [Wait(t.broadcast_until, f"broadcast of {digest[:12]}")], None
    if t is None or not t.has_manifest:
        asked = t.manifest_requested_at if t else None
        if asked is None or now - asked >= timeout:
            return [RequestManifest(a, sample)], None
        return [Wait(asked + timeout, f"manifest of {digest[:12]}")], None
    live = {i: at for i, at in t.outstanding.items() if now - at < timeout}
    candidates = [i for i in range(t.chunks) if i not in t.have and i not in live]
    steps: list[Step] = []
    if live:
        steps.append(Wait(min(live.values()) + timeout, f"chunks of {digest[:12]}"))
    return steps, ((candidates, len(live)) if candidates else None)


def _share_window(demands: Sequence[_ChunkDemand], window: int, in_flight: int) -> list[list[Step]]:
    """The chunk requests of each artifact that lacks chunks, the window split evenly between them.

    Each artifact asking for chunks gets an equal share of the slots that the others' requests
    do not hold (the first ones in plan order get the remainder), less its own requests in flight;
    the half-window rule of `chunk_requests` applies to that share. Without the split, a model
    whose stalled chunks all time out at once takes the whole window at every retry, and its
    sample (or a second tenant's model) is never asked for, so a sample the controller no longer
    serves never fails the assignment.
    """
    held = in_flight - sum(d.in_flight for d in demands)
    shared = max(0, window - held)
    out: list[list[Step]] = []
    for n, d in enumerate(demands):
        share = shared // len(demands) + (1 if n < shared % len(demands) else 0)
        free = max(0, min(share - d.in_flight, window - in_flight))
        requests = chunk_requests(d.candidates, free, share)
        in_flight += sum(len(r) for r in requests)
        out.append([RequestChunks(d.digest, indices) for indices in requests])
    return out


def plan(desired: Desired | None, current: Current, now: float) -> list[Step]:
    state = current.state
    steps: list[Step] = []
    # Commits and rollbacks of updates in progress, executed before the rest of the plan.
    finishing: list[Step] = []
    waits: list[Wait] = []
    converged = desired is not None
    seen_digests: set[str] = set()
    demands: list[_ChunkDemand] = []
    # The transfer window bounds the chunk requests outstanding across all artifacts.
    in_flight = sum(
        1
        for t in current.transfers.values()
        for at in t.outstanding.values()
        if now - at < current.request_timeout_s
    )

    for a in desired.assignments if desired is not None else ():
        assert desired is not None
        ts = state.tenants.get(a.tenant)
        active = ts.active if ts else None
        machine = _machine_steps(a, desired, current, now)
        if machine is not None:
            # Executed first: a transfer of the newer artifact for another tenant enters this
            # tenant's update as well, which must not happen while its model is on probation.
            converged = False
            waits.extend(s for s in machine if isinstance(s, Wait))
            finishing.extend(s for s in machine if not isinstance(s, Wait))
            continue
        if active is not None and active.assignment == a:
            continue
        converged = False
        if failure_reason(desired, current, a) is not None:
            continue
        reason = precheck(a, current.runtimes)
        if reason is not None:
            steps.append(Fail(a, reason))
            seen_digests.add(a.digest)
            continue
        missing = [(d, sample) for d, sample in pieces(a) if d not in current.installed]
        if not missing:
            steps.append(Activate(a))
        for digest, sample in missing:
            if digest in seen_digests:
                continue
            seen_digests.add(digest)
            if (t := current.transfers.get(digest)) is not None and t.complete:
                steps.append(Verify(digest))
                continue
            transfer_steps, demand = _transfer_steps(a, current, now, sample)
            waits.extend(s for s in transfer_steps if isinstance(s, Wait))
            steps.extend(s for s in transfer_steps if not isinstance(s, Wait))
            if demand is not None:
                demands.append(_ChunkDemand(len(steps), digest, *demand))
        seen_digests.add(a.digest)

    # Inserted from the last so that each position still points where its artifact was planned.
    for d, requests in reversed(
        list(zip(demands, _share_window(demands, current.window, in_flight), strict=True))
    ):
        steps[d.position : d.position] = requests
    steps = finishing + steps
    if desired is not None:
        wanted = {a.tenant for a in desired.assignments}
        steps.extend(Deactivate(t) for t in sorted(state.tenants) if t not in wanted)
        if converged and not steps and state.applied_generation < desired.generation:
            steps.append(MarkApplied(desired.generation))
        if converged and not steps:
            garbage = _garbage(desired, current)
            if garbage:
                steps.append(CollectGarbage(garbage))

    report = build_report(desired, current)
    if current.connected and report != current.reported:
        progress_only = current.reported is not None and report.structure() == current.reported.structure()
        if not progress_only or now - current.reported_at >= PROGRESS_REPORT_INTERVAL_S:
            steps.insert(0, ReportState(report))
        else:
            waits.append(Wait(current.reported_at + PROGRESS_REPORT_INTERVAL_S, "progress report"))
    return steps + _earliest(waits)


def _earliest(waits: list[Wait]) -> list[Step]:
    return [min(waits, key=lambda w: w.until)] if waits else []


def _garbage(desired: Desired, current: Current) -> tuple[str, ...]:
    keep = {d for a in desired.assignments for d, _ in pieces(a)}
    for ts in current.state.tenants.values():
        keep.update(d for i in (ts.active, ts.previous) if i is not None for d, _ in pieces(i.assignment))
    return tuple(sorted((set(current.installed) | set(current.transfers)) - keep))
