"""Rollouts: a model version sent to a target in waves, judged by gates, rolled back when it misbehaves.

This module is the service the API calls: it validates and stores a plan,
resolves its target into waves, runs engine passes (plan -> persist -> act, see
:mod:`controller.rollout_engine` and :mod:`controller.rollout_executor`), takes
the operator's commands and reads rollouts back. :class:`RolloutRunner` is the
controller thread that keeps every active rollout moving.

A plain rollout, "send this version to these devices now", is a one-wave plan
without gates; two such plans on the same device supersede each other. Any
staged plan (waves, soak, gates, approval, rollback) refuses to share a device
and tenant with another active rollout.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.tenancy import DEFAULT_TENANT, SHADOW_SUFFIX, TENANT_ID
from edgefleet_proto.wave import rollout_wave, wave_id

from controller.errors import (
    CommandRefused,
    InvalidInputError,
    RolloutConflict,
    RolloutNotFound,
    UnknownTargets,
)
from controller.fleet import Fleet, Reported
from controller.groups import Groups
from controller.leases import Lease, LeaseLost
from controller.maintenance import MaintenanceWindows
from controller.profiles import Profiles, Targeted
from controller.registry import FORMAT, Registry
from controller.rollout_engine import (
    ACTIVE_STATES,
    COMMANDS,
    Action,
    Command,
    DeviceRolloutStatus,
    DeviceView,
    Phase,
    Run,
    SetDesired,
    State,
    Wait,
    carries,
    desired_with,
    iso_time,
    plan,
)
from controller.rollout_engine import shadow_tenant as shadow_of
from controller.rollout_executor import (
    EXECUTORS,
    Outgoing,
    active_digest,
    decode_desired,
    device_status,
    load_run,
    member_status,
    record,
    set_state,
    snapshot,
)
from controller.rollout_plans import Plan, Target, split_waves, validate
from controller.store import Store

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
# Engine passes per advance() call; a pass that changes the run is followed by another.
MAX_ROUNDS = 16
RUNNER_INTERVAL_S = 0.5

RolloutStatus = Literal["in_progress", "succeeded", "failed"]
# Where retrying the failed devices makes sense: the rollout still goes on, or stopped on them.
RETRYABLE = (State.RUNNING, State.PAUSED, State.FAILED)


class DesiredPublisher(Protocol):
    def publish_desired(self, device_id: str, payload: bytes) -> None: ...


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    status: DeviceRolloutStatus
    detail: str
    updated_at: float
    wave: int


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    version: str
    tenant: str
    digest: str
    status: RolloutStatus
    state: str
    # 1-based; 0 before the first wave starts.
    wave: int
    waves: int
    reason: str
    created_at: float
    plan: dict[str, Any]
    devices: list[RolloutDevice]


@dataclass(frozen=True)
class RolloutEvent:
    at: float
    kind: str
    wave: int
    device_id: str
    state: str
    reason: str


def is_tenant_slot(tenant: str) -> bool:
    """Whether a rollout may name ``tenant``: a tenant id as the contract defines it (the one
    pattern tenant specs are checked with too), or such an id's shadow slot, ``{id}.shadow``."""
    return bool(TENANT_ID.match(tenant.removesuffix(SHADOW_SUFFIX)))


def rollout_status(statuses: Sequence[str]) -> RolloutStatus:
    """The live rule: succeeded when every device is active; failed once all finished and one failed."""
    if statuses and all(s == "active" for s in statuses):
        return "succeeded"
    if statuses and all(s in ("active", "failed") for s in statuses):
        return "failed"
    return "in_progress"


def coarse_status(plan: Plan, state: State, statuses: Sequence[str]) -> RolloutStatus:
    """A plain plan keeps the live rule; a staged one reports the engine's verdict."""
    live = state in (State.RUNNING, State.SUCCEEDED, State.FAILED) and not plan.staged
    if live or state is State.SUPERSEDED:
        return rollout_status(statuses)
    if state in ACTIVE_STATES:
        return "in_progress"
    if state is State.SUCCEEDED:
        return "succeeded"
    return "failed"


class Rollouts:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        fleet: Fleet,
        clock: Callable[[], float] = time.time,
        broadcast: bool = False,
    ) -> None:
        self.store = store
        # Whether new rollouts send each wave's artifacts by wave broadcast (controller.wave_broadcast).
        self.broadcast = broadcast
        self.registry = registry
        self.fleet = fleet
        self.clock = clock
        self.publisher: DesiredPublisher | None = None
        self.profiles = Profiles(store, registry)
        # Groups and windows read time through the engine's clock, so a test that moves it moves them.
        self.groups = Groups(store, lambda: self.clock())
        self.windows = MaintenanceWindows(store, self.groups, lambda: self.clock())
        self._lock = threading.RLock()
        # Where several controller processes share the database, engine passes run only in the
        # one holding this lease (controller.leases), fenced by it; None: this process alone.
        self.lease: Lease | None = None

    # -- create ---------------------------------------------------------------

    def create(
        self,
        model: str,
        version: str,
        device_ids: Sequence[str] = (),
        tenant: str = DEFAULT_TENANT,
        plan_: Plan | None = None,
    ) -> Rollout:
        if not is_tenant_slot(tenant):
            raise InvalidInputError(
                f"invalid tenant {tenant!r}: use a tenant id (1-64 letters, digits, '_' or '-', starting"
                f" with a letter or digit), or one followed by {SHADOW_SUFFIX!r} for its shadow slot"
            )
        the_plan = plan_ or Plan(Target(devices=tuple(dict.fromkeys(device_ids))))
        if the_plan.target.empty:
            raise InvalidInputError(
                "a rollout needs at least one device (or tags, a profile, a group, or all devices)"
            )
        validate(the_plan)
        if the_plan.shadow is not None and tenant.endswith(SHADOW_SUFFIX):
            raise InvalidInputError(
                f"tenant {tenant!r} is itself a shadow slot; a shadow phase is for the live tenant"
            )
        found = self.registry.find(model, version)
        problems = []
        if found is None:
            problems.append(f"unknown model version {model} {version}")
        explicit = list(the_plan.target.devices)
        known = self.fleet.known(explicit)
        missing = [d for d in explicit if d not in known]
        if missing:
            problems.append(f"unknown devices: {', '.join(missing)}")
        group = the_plan.target.group
        unknown_group = group is not None and not self.groups.exists(group)
        if unknown_group:
            problems.append(f"unknown group {group} (see `edgefleet groups list`)")
        if found is None or missing or unknown_group:
            raise UnknownTargets("; ".join(problems))
        if group is not None and not self.groups.members(group):
            raise InvalidInputError(f"group {group} has no devices; add some before rolling out to it")
        targets = self._resolve(the_plan.target)
        if not targets:
            raise InvalidInputError(f"the target matches no registered device: {_describe(the_plan.target)}")
        rollout_id = uuid.uuid4().hex
        wanted = fleet_pb2.ModelAssignment(
            tenant=tenant,
            model_name=model,
            model_version=version,
            artifact_digest=found.digest,
            artifact_size=found.size,
            format=FORMAT,
            runtime=RUNTIME,
            rollout_id=rollout_id,
            probation_s=the_plan.probation_s,
            max_error_rate=the_plan.probation_max_error_rate,
            # The staging smoke test runs the version's samples; tenants read its signature.
            sample_digest=found.sample_digest,
            sample_size=found.sample_size,
            model_signature=found.signature.to_proto(),
        )
        # Variant choice (docs/device-profiles.md): each device gets the signed variant its profile runs best
        # (controller.variants.choose); a device that can run none is skipped with the reason.
        targeted = {d: self.profiles.target(d, found, wanted) for d in targets}
        skipped = {d: t.choice.reason for d, t in targeted.items() if t.assignment is None}
        if the_plan.shadow is not None:
            # A shadow candidate runs beside the tenant's live model on its inputs: a device
            # with no model in the tenant could only fail the gate at the end of the soak.
            skipped |= {
                d: f"no model is live in tenant {tenant} for the shadow candidate to run beside; "
                "roll a version out to the tenant first"
                for d in targets
                if d not in skipped and self._previous(d, tenant) is None
            }
        if len(skipped) == len(targets):
            raise InvalidInputError(
                f"no target device can run {model} {version}: "
                + "; ".join(f"{d}: {reason}" for d, reason in skipped.items())
            )
        targets = [d for d in targets if d not in skipped]
        now = self.clock()
        waves = split_waves(targets, the_plan.waves)
        start = the_plan.start_at
        scheduled = f"scheduled to start at {iso_time(start)}" if start is not None and start > now else ""
        with self._lock, self.store.transaction() as tx:
            self._claim(tx, rollout_id, tenant, targets, the_plan)
            tx.execute(
                "INSERT INTO rollouts (id, model, version, tenant, digest, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (rollout_id, model, version, tenant, found.digest, now),
            )
            tx.execute(
                "INSERT INTO rollout_runs (rollout_id, plan, state, reason, updated_at) VALUES (?, ?, ?, ?, ?)",
                (rollout_id, json.dumps(the_plan.to_json()), State.RUNNING.value, scheduled, now),
            )
            for index, wave in enumerate(waves):
                for device_id in wave:
                    previous = self._previous(device_id, tenant)
                    tx.execute(
                        "INSERT INTO rollout_members (rollout_id, device_id, tenant, wave, wanted, previous)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            rollout_id,
                            device_id,
                            tenant,
                            index,
                            encode(self._in_wave(_wanted(targeted[device_id]), rollout_id, index)),
                            encode(previous) if previous else None,
                        ),
                    )
            for device_id, t in targeted.items():
                tx.execute(
                    "INSERT INTO rollout_targets (rollout_id, device_id, variant, digest, skipped)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        rollout_id,
                        device_id,
                        t.assignment.variant if t.assignment and device_id not in skipped else "",
                        t.assignment.artifact_digest if t.assignment and device_id not in skipped else "",
                        skipped.get(device_id, ""),
                    ),
                )
            sizes = "/".join(str(len(w)) for w in waves)
            later = f"; {scheduled}" if scheduled else ""
            record(
                tx,
                rollout_id,
                "created",
                -1,
                State.RUNNING.value,
                f"{len(targets)} devices in waves of {sizes}{later}",
            )
        log.info(
            "rollout created rollout=%s model=%s version=%s tenant=%s digest=%s devices=%d waves=%s",
            rollout_id, model, version, tenant, found.digest, len(targets), sizes,
        )  # fmt: skip
        self.advance(rollout_id)
        return self.get(rollout_id)

    def _resolve(self, target: Target) -> list[str]:
        devices = self.fleet.all()
        chosen = {d.device_id for d in devices} if target.all_devices else None
        if target.devices:
            ids = set(target.devices)
            chosen = ids if chosen is None else chosen & ids
        if target.tags:
            tagged = {d.device_id for d in devices if set(target.tags) <= set(d.tags)}
            chosen = tagged if chosen is None else chosen & tagged
        if target.profile:
            rows = self.store.query(
                "SELECT device_id FROM device_profiles WHERE profile_id = ?", (target.profile,)
            )
            profiled = {r["device_id"] for r in rows}
            chosen = profiled if chosen is None else chosen & profiled
        if target.group:
            grouped = set(self.groups.members(target.group))
            chosen = grouped if chosen is None else chosen & grouped
        return sorted(chosen or ())

    def _claim(self, tx: Store, rollout_id: str, tenant: str, targets: list[str], new: Plan) -> None:
        """Refuse a second active rollout on a device and tenant; plain ones supersede plain ones."""
        marks = ",".join("?" * len(targets))
        states = [s.value for s in ACTIVE_STATES]
        # A shadow phase also uses the tenant's shadow slot: such a plan and a rollout straight to
        # that slot may not share a device either.
        base = tenant.removesuffix(SHADOW_SUFFIX)
        related = sorted({tenant, shadow_of(tenant), base})
        rows = tx.query(
            f"SELECT m.rollout_id, m.device_id, m.tenant, u.state, u.plan FROM rollout_members m"
            f" JOIN rollout_runs u ON u.rollout_id = m.rollout_id WHERE m.tenant IN ({','.join('?' * len(related))})"
            f" AND u.state IN ({','.join('?' * len(states))}) AND m.device_id IN ({marks})"
            f" ORDER BY m.rollout_id, m.device_id",
            [*related, *states, *targets],
        )
        rows = [r for r in rows if r["tenant"] == tenant or _shares_shadow_slot(tenant, new, r)]
        if not rows:
            return
        busy: dict[str, list[str]] = {}
        for r in rows:
            busy.setdefault(r["rollout_id"], []).append(r["device_id"])
        plans = {r["rollout_id"]: (Plan.from_json(json.loads(r["plan"])), r["state"]) for r in rows}
        if new.staged or any(p.staged for p, _ in plans.values()) or any(r["tenant"] != tenant for r in rows):
            other, devices = next(iter(busy.items()))
            shown = ", ".join(devices[:5]) + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")
            raise RolloutConflict(
                f"device {shown} (tenant {tenant}) is already in active rollout {other} "
                f"({plans[other][1]}); abort or roll it back first"
            )
        for other in busy:
            _lock_run(tx, other)
            set_state(tx, other, State.SUPERSEDED, f"superseded by rollout {rollout_id}", self.clock())
            record(tx, other, "superseded", -1, State.SUPERSEDED.value, f"superseded by rollout {rollout_id}")

    def _previous(self, device_id: str, tenant: str) -> fleet_pb2.ModelAssignment | None:
        row = self.store.query_one("SELECT desired FROM devices WHERE device_id = ?", (device_id,))
        desired = decode_desired(row["desired"]) if row else None
        for m in desired.models if desired is not None else []:
            if (m.tenant or DEFAULT_TENANT) == tenant:
                return m
        return None

    def _in_wave(
        self, assignment: fleet_pb2.ModelAssignment, rollout_id: str, wave: int
    ) -> fleet_pb2.ModelAssignment:
        """The assignment as wave ``wave`` sends it: by its broadcast when rollouts broadcast."""
        if not self.broadcast:
            return assignment
        sent = fleet_pb2.ModelAssignment()
        sent.CopyFrom(assignment)
        sent.broadcast.wave_id = wave_id(rollout_id, wave)
        return sent

    def wave_is_current(self, wave: str) -> bool:
        """Whether ``wave`` is the wave its rollout is at, and the rollout goes on."""
        parsed = rollout_wave(wave)
        if parsed is None:
            return False
        rollout_id, index = parsed
        states = [s.value for s in ACTIVE_STATES]
        row = self.store.query_one(
            f"SELECT wave FROM rollout_runs WHERE rollout_id = ? AND state IN ({','.join('?' * len(states))})",
            (rollout_id, *states),
        )
        return row is not None and row["wave"] == index

    # -- the engine loop --------------------------------------------------------

    def active_ids(self) -> list[str]:
        states = [s.value for s in ACTIVE_STATES]
        rows = self.store.query(
            f"SELECT rollout_id FROM rollout_runs WHERE state IN ({','.join('?' * len(states))})"
            " ORDER BY rollout_id",
            states,
        )
        return [r["rollout_id"] for r in rows]

    def advance(self, rollout_id: str) -> float:
        """Plan, persist, execute, plan again until only waiting is left; returns the next deadline.
        Nothing (inf) in a process that does not hold the engine's lease: its holder moves the rollout."""
        if self.lease is not None and not self.lease.held:
            return math.inf
        with self._lock:
            for _ in range(MAX_ROUNDS):
                run = load_run(self.store, rollout_id)
                if run is None:
                    return math.inf
                now = self.clock()
                steps = plan(run, self._with_windows(run, snapshot(self.store, run, now), now), now)
                work = [s for s in steps if not isinstance(s, Wait)]
                if not work:
                    return min((s.until for s in steps if isinstance(s, Wait)), default=math.inf)
                outgoing: list[Outgoing] = []
                try:
                    with self.store.transaction() as tx:
                        self._hold(tx, run)
                        for step in work:
                            outgoing += EXECUTORS[step.action](tx, run, step, now)
                except _RunChanged:
                    continue
                except LeaseLost as exc:
                    log.warning("engine pass rolled back rollout=%s reason=%s", rollout_id, exc)
                    return math.inf
                for step in work:
                    self._log_step(run.id, step)
                for out in outgoing:
                    if self.publisher is not None:
                        self.publisher.publish_desired(out.device_id, out.payload)
            return now

    def _hold(self, tx: Store, run: Run) -> None:
        """In an engine pass's transaction, before any write: this process still holds the engine's
        lease (a fencing check, so a process that lost it while paused rolls back instead of acting
        a second time), and the run is still the one the steps were planned from (another
        process's operator command may have changed it meanwhile: the pass is planned again)."""
        if self.lease is not None:
            self.lease.fence(tx)
        _lock_run(tx, run.id)
        row = tx.query_one(
            "SELECT state, wave, phase, reason, soak_started_at, promoted, approved_wave FROM rollout_runs"
            " WHERE rollout_id = ?",
            (run.id,),
        )
        planned = (
            run.state.value, run.wave, run.phase.value, run.reason, run.soak_started_at, int(run.promoted),
            run.approved_wave,
        )  # fmt: skip
        if row is None or tuple(row.values()) != planned:
            raise _RunChanged

    def _with_windows(self, run: Run, views: dict[str, DeviceView], now: float) -> dict[str, DeviceView]:
        """The current wave's devices not yet sent anything, with their maintenance windows."""
        if run.state is not State.RUNNING:
            return views
        shadow = run.phase is Phase.SHADOW and run.plan.shadow is not None
        waiting = [
            m.device_id
            for m in run.members
            if m.wave == run.wave and (m.shadow_set_at if shadow else m.set_at) is None
        ]
        for device_id, status in self.windows.statuses(waiting, now).items():
            if not status.open:
                views[device_id] = replace(views[device_id], window=status)
        return views

    @staticmethod
    def _log_step(rollout_id: str, step: Any) -> None:
        if isinstance(step, SetDesired):
            log.info(
                "desired state set rollout=%s device=%s generation=%d revert=%s reason=%r models=%s",
                rollout_id,
                step.device_id,
                step.desired.generation,
                step.revert,
                step.reason,
                ";".join(f"{a.tenant}:{a.model_name}@{a.model_version}" for a in step.desired.models),
            )
            return
        level = logging.WARNING if step.action in (Action.PAUSE, Action.ROLL_BACK) else logging.INFO
        log.log(level, "rollout step rollout=%s action=%s reason=%r", rollout_id, step.action, step.reason)

    # -- operator commands ------------------------------------------------------

    def command(self, rollout_id: str, command: Command, note: str = "") -> Rollout:
        with self._lock, self.store.transaction() as tx:
            _lock_run(tx, rollout_id)
            run = load_run(tx, rollout_id)
            if run is None:
                raise RolloutNotFound(f"unknown rollout {rollout_id}")
            target = COMMANDS.get((run.state, command))
            if target is None:
                raise CommandRefused(f"cannot {command.value} rollout {rollout_id}: it is {run.state.value}")
            reason = f"operator: {note or command.value}"
            extra: dict[str, Any] = {}
            if command is Command.PROMOTE:
                extra["promoted"] = 1
            if command in (Command.APPROVE, Command.PROMOTE):
                extra["approved_wave"] = run.wave + 1
            set_state(tx, rollout_id, target, reason, self.clock(), **extra)
            record(tx, rollout_id, command.value, run.wave, target.value, reason)
        log.info("rollout command rollout=%s command=%s state=%s", rollout_id, command.value, target.value)
        self.advance(rollout_id)
        return self.get(rollout_id)

    def retry_failed(self, rollout_id: str, note: str = "") -> Rollout:
        """Send the wanted version again to the devices whose update failed, and only to them;
        the rollout runs on from where it was (a paused or failed one runs again)."""
        with self._lock:
            now = self.clock()
            outgoing: list[Outgoing] = []
            with self.store.transaction() as tx:
                _lock_run(tx, rollout_id)
                run = load_run(tx, rollout_id)
                if run is None:
                    raise RolloutNotFound(f"unknown rollout {rollout_id}")
                if run.state not in RETRYABLE:
                    raise CommandRefused(
                        f"cannot retry the failed devices of rollout {rollout_id}: it is {run.state.value}"
                    )
                views = snapshot(tx, run, now)
                failed = [
                    m
                    for m in run.members
                    if m.set_at is not None
                    and views[m.device_id].status == "failed"
                    and carries(views[m.device_id].desired, m.wanted)
                ]
                if not failed:
                    raise CommandRefused(f"rollout {rollout_id} has no failed device to retry")
                reason = f"operator: {note or 'retry failed devices'}"
                for m in failed:
                    view = views[m.device_id]
                    step = SetDesired(
                        m.device_id,
                        desired_with(view, run.tenant, m.wanted, now),
                        revert=False,
                        reason=f"{reason}: send {m.wanted.model_name} {m.wanted.model_version} again",
                    )
                    outgoing += EXECUTORS[step.action](tx, run, step, now)
                    tx.execute(
                        "INSERT INTO rollout_retries (rollout_id, device_id, generation, at) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (rollout_id, device_id) DO UPDATE SET generation = excluded.generation,"
                        " at = excluded.at",
                        (rollout_id, m.device_id, step.desired.generation, now),
                    )
                set_state(tx, rollout_id, State.RUNNING, reason, now)
                names = ", ".join(m.device_id for m in failed)
                record(tx, rollout_id, "retry_failed", run.wave, State.RUNNING.value, f"{reason}: {names}")
            for out in outgoing:
                if self.publisher is not None:
                    self.publisher.publish_desired(out.device_id, out.payload)
        log.info("rollout retry rollout=%s devices=%s", rollout_id, names)
        self.advance(rollout_id)
        return self.get(rollout_id)

    # -- reading ----------------------------------------------------------------

    def get(self, rollout_id: str) -> Rollout:
        row = self.store.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        run = load_run(self.store, rollout_id)
        if row is None or run is None:
            raise RolloutNotFound(f"unknown rollout {rollout_id}")
        devices_rows = self.store.query(
            "SELECT d.device_id, d.reported, d.reported_received_at, d.desired, d.desired_generation"
            " FROM rollout_members m"
            " JOIN devices d ON d.device_id = m.device_id WHERE m.rollout_id = ?",
            (rollout_id,),
        )
        by_id = {r["device_id"]: r for r in devices_rows}
        now = self.clock()
        unsent = [m.device_id for m in run.members if m.wave == run.wave and m.set_at is None]
        windows = self.windows.statuses(unsent, now) if run.state is State.RUNNING else {}
        start_at = run.plan.start_at if run.wave < 0 and run.state is State.RUNNING else None
        devices = []
        for m in sorted(run.members, key=lambda m: m.device_id):
            r = by_id[m.device_id]
            reported = Reported.from_json(r["reported"]) if r["reported"] else None
            desired = decode_desired(r["desired"])
            status, detail = member_status(self.store, run, m, reported, r["desired_generation"])
            reverted = run.state in (State.ROLLING_BACK, State.ROLLED_BACK) and not carries(desired, m.wanted)
            if m.set_at is not None and reverted:
                back_to = m.previous.artifact_digest if m.previous else None
                name = f"{m.previous.model_name} {m.previous.model_version}" if m.previous else "no model"
                status = "rolled_back"
                here = active_digest(run.tenant, reported) == back_to
                detail = (
                    f"back on {name}" if here else f"sent back to {name}; the device has not confirmed yet"
                )
            elif m.set_at is None and m.shadow_set_at is not None and reverted:
                status = "rolled_back"
                cleared = "cleared" if not carries(desired, m.shadow()) else "being cleared"
                detail = f"shadow candidate {cleared}; it never went live"
            elif (
                m.set_at is None
                and m.shadow_set_at is not None
                and run.state in (State.ABORTING, State.ABORTED)
                and not carries(desired, m.wanted)
            ):
                status = "shadow"
                cleared = "cleared" if not carries(desired, m.shadow()) else "being cleared"
                detail = f"rollout aborted: shadow candidate {cleared}; it never went live"
            elif m.set_at is None and m.shadow_set_at is not None and not carries(desired, m.wanted):
                loaded, why = device_status(shadow_of(run.tenant), m.wanted.artifact_digest, reported)
                status = "shadow"
                phase = "in shadow beside the live model" if run.phase is Phase.SHADOW else "was in shadow"
                detail = f"candidate {phase}: {loaded}" + (f" ({why})" if why else "")
            elif m.set_at is None and not carries(desired, m.wanted):
                status, detail = "waiting", f"wave {m.wave + 1}; rollout {run.state.value}"
                if start_at is not None and now < start_at:
                    detail = f"wave {m.wave + 1}; rollout scheduled to start at {iso_time(start_at)}"
                elif m.device_id in windows and not windows[m.device_id].open:
                    detail = windows[m.device_id].reason
            elif status == "pending":
                detail = _superseded(rollout_id, run.tenant, desired) or detail
            matched = status not in ("pending", "waiting") and r["reported_received_at"] is not None
            devices.append(
                RolloutDevice(
                    device_id=m.device_id,
                    status=status,
                    detail=detail,
                    updated_at=r["reported_received_at"] if matched else row["created_at"],
                    wave=m.wave + 1,
                )
            )
        return Rollout(
            id=row["id"],
            model=row["model"],
            version=row["version"],
            tenant=row["tenant"],
            digest=row["digest"],
            status=coarse_status(run.plan, run.state, [d.status for d in devices]),
            state=run.state.value,
            wave=run.wave + 1,
            waves=len(run.plan.waves),
            reason=run.reason,
            created_at=row["created_at"],
            plan=run.plan.to_json(),
            devices=sorted(devices + self._skipped(rollout_id, row["created_at"]), key=lambda d: d.device_id),
        )

    def _skipped(self, rollout_id: str, created_at: float) -> list[RolloutDevice]:
        """Targets no variant fits: named with the reason, never sent anything."""
        rows = self.store.query(
            "SELECT device_id, skipped FROM rollout_targets WHERE rollout_id = ? AND skipped != ''",
            (rollout_id,),
        )
        return [RolloutDevice(r["device_id"], "skipped", r["skipped"], created_at, 0) for r in rows]

    def all(self) -> list[Rollout]:
        rows = self.store.query("SELECT id FROM rollouts ORDER BY created_at DESC, id")
        return [self.get(r["id"]) for r in rows]

    def events(self, rollout_id: str) -> list[RolloutEvent]:
        if self.store.query_one("SELECT id FROM rollouts WHERE id = ?", (rollout_id,)) is None:
            raise RolloutNotFound(f"unknown rollout {rollout_id}")
        rows = self.store.query(
            "SELECT * FROM rollout_events WHERE rollout_id = ? ORDER BY id", (rollout_id,)
        )
        return [
            RolloutEvent(r["at"], r["kind"], r["wave"] + 1, r["device_id"], r["state"], r["reason"])
            for r in rows
        ]


class _RunChanged(Exception):
    """The run changed between an engine pass's plan and its transaction."""


def _lock_run(tx: Store, rollout_id: str) -> None:
    """Writes to one rollout's run, from any controller process, one transaction at a time."""
    tx.lock(f"rollout {rollout_id}")


def _shares_shadow_slot(tenant: str, new: Plan, row: dict[str, Any]) -> bool:
    """Whether an active rollout on another tenant (``row``) uses the shadow slot the new one uses."""
    other = row["tenant"]
    if new.shadow is not None and other == shadow_of(tenant):
        return True
    return tenant == shadow_of(other) and Plan.from_json(json.loads(row["plan"])).shadow is not None


def _superseded(rollout_id: str, tenant: str, desired: fleet_pb2.DesiredState | None) -> str:
    for m in desired.models if desired is not None else []:
        if m.tenant == tenant and m.rollout_id != rollout_id:
            return f"superseded by rollout {m.rollout_id}"
    return ""


def _wanted(targeted: Targeted) -> fleet_pb2.ModelAssignment:
    assert targeted.assignment is not None  # skipped devices are not members
    return targeted.assignment


def _describe(target: Target) -> str:
    parts = []
    if target.all_devices:
        parts.append("all devices")
    if target.devices:
        parts.append(f"devices {', '.join(target.devices)}")
    if target.tags:
        parts.append(f"tags {', '.join(target.tags)}")
    if target.profile:
        parts.append(f"profile {target.profile}")
    if target.group:
        parts.append(f"group {target.group}")
    return " and ".join(parts)


class RolloutRunner:
    """The controller thread that keeps every active rollout moving."""

    def __init__(self, rollouts: Rollouts, interval_s: float = RUNNER_INTERVAL_S) -> None:
        self.rollouts = rollouts
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        log.info("rollout engine started interval_s=%.2f", self.interval_s)
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        lease = self.rollouts.lease
        if lease is not None and not lease.held:
            return
        try:
            ids = self.rollouts.active_ids()
        except Exception:
            log.exception("rollout engine cannot list active rollouts")
            return
        for rollout_id in ids:
            try:
                self.rollouts.advance(rollout_id)
            except Exception:
                # One broken rollout must not stop the others; the next tick retries it.
                log.exception("rollout engine pass failed rollout=%s", rollout_id)
