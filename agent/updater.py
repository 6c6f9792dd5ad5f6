"""The executor of the reconciler's plans, and the owner of the device state.

Each :class:`~agent.reconciler.Action` maps to one method in ``handlers``; the
service loop calls :meth:`Updater.converge`, which plans, executes, and plans
again until only waiting is left. A desired state updates the persisted state;
manifests, chunks and broadcast frames go to the transfers under way
(:mod:`agent.intake`); the planner decides what follows. Every state change is
written (atomically) before the act it allows:
the new desired state before downloading, the new active model before it
serves, a failure before it is reported.

A full data disk is a condition, not a failure (:mod:`agent.diskspace`): the
write that hit it is dropped and reported as ``disk_full``, nothing that moves
an update forward runs until free space is back, and endings (failures,
rollbacks) still happen, their state kept in memory until it can be written.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.tenancy import tenant_or_default
from edgefleet_proto.topics import Kind

from agent.artifacts import ArtifactStore
from agent.broadcast import reception
from agent.conditions import DESIRED_REFUSED, Conditions
from agent.diskspace import FreeSpace, is_disk_full
from agent.errors import (
    AgentError,
    DiskFull,
    MemoryBudgetExceeded,
    ModelError,
)
from agent.intake import EmitEvent, Intake, Publisher, Transfer, event_attrs
from agent.pool import ModelPool, ServingModel
from agent.reconciler import (
    Action,
    Activate,
    CollectGarbage,
    Commit,
    Current,
    Deactivate,
    Fail,
    Listen,
    MarkApplied,
    Phase,
    Report,
    ReportState,
    RequestChunks,
    RequestManifest,
    RollBack,
    Step,
    Verify,
    Wait,
    plan,
)
from agent.runtime import BACKENDS, LoadedModel
from agent.said_order import SaidOrder
from agent.samples import staging_inputs
from agent.signing import KeyRing
from agent.state import (
    Assignment,
    Desired,
    DeviceState,
    Failure,
    Installed,
    StateStore,
    TenantState,
    Update,
)
from agent.update_machine import (
    CRASH_COUNTED,
    DEFAULT_MAX_ATTEMPTS,
    ENTRY,
    FINAL,
    OUTCOMES,
    UnhandledTransition,
    UpdateEvent,
    UpdateState,
    advance,
    crash_note,
    crash_reason,
    next_state,
    resume,
)

log = logging.getLogger(__name__)

# Plan/execute rounds per converge() call; the loop comes back after inbound work.
MAX_ROUNDS = 32
# What may run while the data disk is full: reporting, the steps that end or remove
# things (their state writes wait in memory, see Updater._save), and the chunks of a
# download already started, which took its whole size from the disk when it began.
# Anything that would start a download, verify, stage or commit waits for free space.
WHILE_DISK_FULL = frozenset(
    {Action.REPORT, Action.FAIL, Action.ROLLBACK, Action.COLLECT_GARBAGE, Action.REQUEST_CHUNKS}
)

_PHASES = {
    Phase.DOWNLOADING: fleet_pb2.MODEL_PHASE_DOWNLOADING,
    Phase.VERIFYING: fleet_pb2.MODEL_PHASE_VERIFYING,
    Phase.LOADING: fleet_pb2.MODEL_PHASE_LOADING,
    Phase.ACTIVE: fleet_pb2.MODEL_PHASE_ACTIVE,
    Phase.FAILED: fleet_pb2.MODEL_PHASE_FAILED,
    Phase.PROBATION: fleet_pb2.MODEL_PHASE_PROBATION,
}
_OUTCOMES = {
    "": fleet_pb2.UPDATE_OUTCOME_UNSPECIFIED,
    "succeeded": fleet_pb2.UPDATE_OUTCOME_SUCCEEDED,
    "failed": fleet_pb2.UPDATE_OUTCOME_FAILED,
    "rolled_back": fleet_pb2.UPDATE_OUTCOME_ROLLED_BACK,
}
# Fault injection for the crash-safety tests: SIGKILL the agent right after it
# persisted this update state (e.g. "probation"). Unset in production.
KILL_AT_ENV = "EDGEFLEET_AGENT_KILL_AT"


Probe = Callable[[str, str, str], tuple[int, int]]


def _no_probe(tenant: str, model_name: str, model_version: str) -> tuple[int, int]:
    return 0, 0


class Updater:
    def __init__(
        self,
        device_id: str,
        states: StateStore,
        artifacts: ArtifactStore,
        pool: ModelPool,
        link: Publisher,
        emit: EmitEvent,
        agent_version: str,
        window: int = 8,
        request_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        keys: KeyRing | None = None,
        probe: Probe = _no_probe,
        conditions: Conditions | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.device_id = device_id
        self.conditions = conditions if conditions is not None else Conditions()
        self.space = FreeSpace(states.path.parent, artifacts.reserve_bytes, self.conditions, clock=clock)
        self.max_attempts = max_attempts
        # The in-memory state is ahead of state.json: a write the full disk refused on an
        # ending or at start. Written first thing once space is back.
        self.unsaved = False
        self._booting = False
        self.probe = probe
        self.kill_at = os.environ.get(KILL_AT_ENV, "")
        self.states = states
        self.artifacts = artifacts
        self.pool = pool
        self.link = link
        self.emit = emit
        self.agent_version = agent_version
        # Numbers each report, so a controller with several ingest processes keeps the newest.
        self._said = SaidOrder()
        self.window = window
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        # The pinned controller key that signs assignments; without one, they are not verified.
        self.keys = keys if keys is not None else KeyRing(states.path.parent, None)
        self.state = DeviceState()
        self.installed: set[str] = set()
        # The artifacts being fetched, and what arrives for them (agent.intake).
        self.intake = Intake(device_id, artifacts, link, emit, self.space, clock, self._fail_digest)
        self.reported: Report | None = None
        self.reported_at = -math.inf
        self.handlers: dict[Action, Callable[[Any], None]] = {
            Action.REPORT: self.report,
            Action.FAIL: self.fail,
            Action.ACTIVATE: self.activate,
            Action.VERIFY: self.verify,
            Action.REQUEST_MANIFEST: self.request_manifest,
            Action.REQUEST_CHUNKS: self.request_chunks,
            Action.LISTEN: self.listen,
            Action.DEACTIVATE: self.deactivate,
            Action.MARK_APPLIED: self.mark_applied,
            Action.COLLECT_GARBAGE: self.collect_garbage,
            Action.COMMIT: self.commit,
            Action.ROLLBACK: self.rollback,
            Action.WAIT: lambda step: None,
        }

    # -- start ----------------------------------------------------------------

    def boot(self) -> None:
        """Load what the device served before it stopped; fall back to the previous model.

        A full disk does not stop the start: what boot would write waits in memory
        (nothing it does moves forward to a model that has not served), and the
        device serves what it has.
        """
        self._booting = True
        try:
            self._boot()
        finally:
            self._booting = False

    def _boot(self) -> None:
        self.state = self.states.load()
        self.installed = set(self.artifacts.installed())
        self._resume_updates()
        for tenant in sorted(self.state.tenants):
            self._boot_tenant(tenant)
        for digest in self.artifacts.pending():
            download = None if digest in self.installed else self.artifacts.open(digest)
            want = self._assignment_for(digest)
            if download is None or want is None:
                self.artifacts.discard(digest)
                continue
            sample = want.digest != digest
            self.intake.transfers[digest] = Transfer(
                want, download, sample=sample, resumed=len(download.have), reception=reception(want, sample)
            )
            log.info(
                "download resumed device=%s digest=%s have=%d/%d",
                self.device_id,
                digest[:12],
                len(download.have),
                download.chunks,
            )
        if self.state.desired is not None:
            self.pool.expect(frozenset(a.tenant for a in self.state.desired.assignments))

    def _boot_tenant(self, tenant: str) -> None:
        ts = self.state.tenants[tenant]
        for candidate in (ts.active, ts.previous):
            if candidate is None:
                continue
            try:
                self._serve(candidate.assignment, self._load(candidate.assignment))
            except (ModelError, OSError) as exc:
                a = candidate.assignment
                log.error(
                    "model failed to load at start device=%s tenant=%s model=%s version=%s error=%s",
                    self.device_id,
                    tenant,
                    a.model_name,
                    a.model_version,
                    exc,
                )
                self._save(
                    self.state.with_failure(Failure(a.digest, str(exc), self.state.desired_generation))
                )
                self.emit("model_failed", "error", f"cannot load at start: {exc}", event_attrs(a))
                continue
            if candidate is not ts.active:
                self._save(self.state.with_tenant(tenant, TenantState(candidate, None)))
                assert ts.active is not None
                self._drop_unloadable(ts.active.assignment.digest)
            return
        self._save(self.state.with_tenant(tenant, None))
        for broken in (ts.active, ts.previous):
            if broken is not None:
                self._drop_unloadable(broken.assignment.digest)

    def _resume_updates(self) -> None:
        """The one resume switch: where each tenant's persisted update goes after a restart.

        An update found in ``stage`` died with the agent while loading its model: the
        death is counted and persisted before staging may be tried again.
        """
        for tenant, update in sorted(self.state.updates.items()):
            persisted = update.state
            if persisted in CRASH_COUNTED:
                update = update.crashed()
                self._save(self.state.with_update(tenant, update))
            after = resume(persisted, update.crashes, self.max_attempts)
            if after is UpdateState.FAILED:
                self._crashed_out(tenant, update)
            elif persisted is UpdateState.STAGE:
                log.warning(
                    "update resumed device=%s tenant=%s version=%s state=stage crashes=%d max_attempts=%d",
                    self.device_id,
                    tenant,
                    update.assignment.model_version,
                    update.crashes,
                    self.max_attempts,
                )
            elif after is UpdateState.ROLLBACK:
                reason = update.reason or f"the agent restarted during {persisted.value}"
                if persisted in CRASH_COUNTED:
                    # The new model was serving when the agent died: the death counts against it.
                    reason = crash_note(persisted, update.crashes, self.max_attempts)
                    if update.crashes >= self.max_attempts:
                        reason = self._crash_given_up(tenant, update)
                log.warning(
                    "update resumed device=%s tenant=%s version=%s state=%s next=rollback",
                    self.device_id,
                    tenant,
                    update.assignment.model_version,
                    persisted.value,
                )
                self.rollback(RollBack(tenant, reason, UpdateEvent.CRASHED))
            elif after is UpdateState.COMMIT:
                self.commit(Commit(tenant, "resumed after a restart"))

    def _crashed_out(self, tenant: str, update: Update) -> None:
        """The update killed the agent as often as it may while staging: it fails, and is not staged again."""
        # The model file stays: the same artifact assigned again fails at once, without a download.
        self._fail_digest(update.assignment.digest, self._crash_given_up(tenant, update))

    def _crash_given_up(self, tenant: str, update: Update) -> str:
        """Log that the update killed the agent as often as it may; returns the reason it ends with."""
        a = update.assignment
        log.error(
            "update crashed the agent device=%s tenant=%s model=%s version=%s digest=%s crashes=%d states=%s",
            self.device_id,
            tenant,
            a.model_name,
            a.model_version,
            a.digest[:12],
            update.crashes,
            ",".join(update.crashed_in),
        )
        return crash_reason(update.crashes, update.crashed_in)

    def _crash_limit(self, a: Assignment) -> str | None:
        """Why ``a`` is not tried again: it crashed the agent too often for this tenant (any generation)."""
        update = self.state.updates.get(a.tenant)
        if update is None or update.assignment.digest != a.digest or update.crashes < self.max_attempts:
            return None
        return crash_reason(update.crashes, update.crashed_in)

    def _assignment_for(self, digest: str) -> Assignment | None:
        """The desired assignment whose model (first) or sample inputs have ``digest``."""
        assignments = self.state.desired.assignments if self.state.desired else ()
        return next((a for a in assignments if a.digest == digest), None) or next(
            (a for a in assignments if a.sample_digest == digest), None
        )

    # -- inbound --------------------------------------------------------------

    def on_desired(self, msg: fleet_pb2.DesiredState) -> str | None:
        """Take a new desired state; returns why it was refused, if it was."""
        # First of all: a state the controller did not sign for this device changes nothing, not
        # even the generation (one forged huge generation would otherwise hide every real state).
        refused = self.keys.admit(msg, self.device_id)
        if refused is not None:
            # Reported (in memory only), so the controller and the operator see why the device
            # does not follow, e.g. a device provisioned with another controller's key.
            self.conditions.hit(DESIRED_REFUSED, refused)
            return refused
        self.conditions.clear(DESIRED_REFUSED)
        if msg.device_id and msg.device_id != self.device_id:
            return f"desired state is for device {msg.device_id!r}"
        tenants = [tenant_or_default(m.tenant) for m in msg.models]
        if len(set(tenants)) != len(tenants):
            return f"desired state lists a tenant twice: {sorted(tenants)}"
        generation = int(msg.generation)
        if generation < self.state.applied_generation or generation <= self.state.desired_generation:
            log.info(
                "desired ignored device=%s generation=%d applied=%d seen=%d",
                self.device_id,
                generation,
                self.state.applied_generation,
                self.state.desired_generation,
            )
            return None
        desired = Desired.from_proto(msg)
        state = replace(self.state, desired=desired)
        # Unsigned or wrongly signed artifacts fail here, before any download; the tenant keeps its model.
        # What a tenant already runs was verified when it came (perhaps under a key rotated since).
        running = {
            i.assignment.digest for ts in self.state.tenants.values() for i in (ts.active, ts.previous) if i
        }
        for digest, reason in self.keys.refusals(msg, running).items():
            state = state.with_failure(Failure(digest, reason, generation))
            self.emit("artifact_refused", "error", reason, {"digest": digest})
        # Kept in memory on a full disk (it is never sent again, being retained): nothing is
        # downloaded for it before space is back, and then it is written first.
        self._save(state, deferrable=True)
        self.pool.expect(frozenset(tenants))
        log.info("desired received device=%s generation=%d tenants=%s", self.device_id, generation, tenants)
        return None

    def on_link_up(self) -> None:
        # Reported again on the new session; requests in flight are asked for again.
        self.reported = None
        self.intake.on_link_up()

    # -- planning -------------------------------------------------------------

    def current(self) -> Current:
        return Current(
            state=self.state,
            installed=frozenset(self.installed),
            transfers=self.intake.views(self.request_timeout_s),
            connected=self.link.connected,
            runtimes=frozenset(BACKENDS),
            reported=self.reported,
            reported_at=self.reported_at,
            conditions=self.conditions.active(),
            window=self.window,
            request_timeout_s=self.request_timeout_s,
            probes={
                t: self.probe(t, ts.active.assignment.model_name, ts.active.assignment.model_version)
                for t, ts in self.state.tenants.items()
                if ts.active is not None
            },
        )

    def converge(self) -> float:
        """Plan and execute until only waiting is left; returns the earliest deadline."""
        self._look_for_space()
        for _ in range(MAX_ROUNDS):
            steps = plan(self.state.desired, self.current(), self.clock())
            work = [s for s in steps if not isinstance(s, Wait)]
            waits = [s.until for s in steps if isinstance(s, Wait)]
            if self.space.full:
                work = [s for s in work if s.action in WHILE_DISK_FULL]
                waits.append(self.space.next_poll)
            if not work:
                self.intake.follow_broadcasts()
                return min(waits, default=math.inf)
            for step in work:
                self.execute(step)
        self.intake.follow_broadcasts()
        return self.clock()

    def _look_for_space(self) -> None:
        """While the disk is full, see (with backoff) whether what waits fits again; if so, go on."""
        if not self.space.full:
            return
        need = sum(t.size for t in self.intake.transfers.values() if t.download is None)
        if not self.space.poll(need):
            return
        try:
            if self.unsaved:
                self._save(self.state)
        except DiskFull as exc:
            self.space.hit(str(exc))
            return
        # What the full disk refused is asked for again now.
        self.intake.ask_again()

    def execute(self, step: Step) -> None:
        try:
            self.handlers[step.action](step)
        except DiskFull as exc:
            self.space.hit(str(exc))
            log.warning(
                "step waits for disk space device=%s action=%s error=%s", self.device_id, step.action, exc
            )
        except OSError as exc:
            if is_disk_full(exc):
                self.space.hit(str(exc))
            log.error("step failed device=%s action=%s error=%s", self.device_id, step.action, exc)
        except AgentError as exc:
            log.error("step failed device=%s action=%s error=%s", self.device_id, step.action, exc)
            if exc.fatal and isinstance(step, Verify):
                self._fail_digest(step.digest, str(exc))
            elif exc.fatal and isinstance(step, Activate):
                self._fail_digest(step.assignment.digest, str(exc))
                self._drop_unloadable(step.assignment.digest)

    # -- executors, one per action --------------------------------------------

    def report(self, step: ReportState) -> None:
        r = step.report
        msg = fleet_pb2.ReportedState(
            device_id=self.device_id,
            desired_generation=r.desired_generation,
            applied_generation=r.applied_generation,
            agent_version=self.agent_version,
            reported_at_ms=int(time.time() * 1000),
            session=self._said.session,
            seq=self._said.next(),
            models=[
                fleet_pb2.ModelStatus(
                    tenant=m.tenant,
                    model_name=m.model_name,
                    model_version=m.model_version,
                    artifact_digest=m.digest,
                    phase=_PHASES[m.phase],
                    bytes_have=m.bytes_have,
                    bytes_total=m.bytes_total,
                    error=m.error,
                    rollout_id=m.rollout_id,
                    outcome=_OUTCOMES[m.outcome],
                    update_state=m.update_state,
                )
                for m in r.models
            ],
            conditions=[c.to_proto() for c in r.conditions],
        )
        self.link.publish(self.link.topic(Kind.REPORTED), encode(msg), retain=True)
        self.reported, self.reported_at = r, self.clock()

    def fail(self, step: Fail) -> None:
        self._fail_digest(step.assignment.digest, step.reason)

    def _fail_digest(self, digest: str, reason: str, keep_download: bool = False) -> None:
        desired = self.state.desired
        assignments = desired.assignments if desired else ()
        sampled = [a for a in assignments if a.sample_digest == digest]
        if sampled and not any(a.digest == digest for a in assignments):
            # Sample inputs that cannot be fetched fail the versions that carry them; their
            # models are sound, so what arrived of them stays for the generation that fixes it.
            self.intake.transfers.pop(digest, None)
            self.artifacts.discard(digest)
            for model in sorted({a.digest for a in sampled}):
                self._fail_digest(model, f"sample inputs {digest[:12]}: {reason}", keep_download=True)
            return
        failure = Failure(digest, reason, self.state.desired_generation)
        self._save(self.state.with_failure(failure), deferrable=True)
        t = self.intake.transfers.get(digest) if keep_download else self.intake.transfers.pop(digest, None)
        if not keep_download:
            self.artifacts.discard(digest)
        desired = self.state.desired
        for a in desired.assignments if desired else ([t.assignment] if t else []):
            if a.digest != digest:
                continue
            log.error(
                "model failed device=%s tenant=%s model=%s version=%s digest=%s error=%s",
                self.device_id,
                a.tenant,
                a.model_name,
                a.model_version,
                digest[:12],
                reason,
            )
            self.emit("model_failed", "error", reason, event_attrs(a))
        for tenant, update in sorted(self.state.updates.items()):
            # Only a model that never served fails; one that served is rolled back instead.
            if update.assignment.digest == digest and update.state in ENTRY:
                self._end(tenant, UpdateEvent.ERROR, reason)

    def request_manifest(self, step: RequestManifest) -> None:
        t = self._transfer(step.assignment, step.sample)
        if t is None:
            return
        self.intake.request_manifest(t)

    def listen(self, step: Listen) -> None:
        """Subscribe to the wave broadcast of the artifact; its announcement brings the manifest."""
        t = self._transfer(step.assignment, step.sample)
        if t is None:
            return
        self.intake.listen(t, reception(step.assignment, step.sample))
        log.info(
            "listening to the wave broadcast device=%s digest=%s wave=%s",
            self.device_id,
            step.digest[:12],
            step.assignment.wave_id,
        )

    def _transfer(self, a: Assignment, sample: bool) -> Transfer | None:
        """The transfer of the model (or sample inputs) of ``a``, begun now if it was not; None when
        the update may not be tried again."""
        digest = a.sample_digest if sample else a.digest
        t = self.intake.transfers.get(digest)
        if t is None and sample:
            t = self.intake.transfers[digest] = Transfer(a, sample=True, reception=reception(a, True))
            log.info(
                "sample download started device=%s tenant=%s model=%s version=%s digest=%s size=%d",
                self.device_id,
                a.tenant,
                a.model_name,
                a.model_version,
                digest[:12],
                a.sample_size,
            )
        if t is None:
            crashed = self._crash_limit(a)
            if crashed is not None:
                self._fail_digest(a.digest, crashed)
                return None
            # Entered before the transfer exists, so a refused write leaves nothing half begun.
            for wanting in self._wanting(a.digest):
                self._advance(wanting, UpdateEvent.ASSIGNED)
            t = self.intake.transfers[a.digest] = Transfer(a, reception=reception(a))
            log.info(
                "download started device=%s tenant=%s model=%s version=%s digest=%s size=%d",
                self.device_id,
                a.tenant,
                a.model_name,
                a.model_version,
                a.digest[:12],
                a.size,
            )
            self.emit(
                "download_started", "info", f"downloading {a.model_name} {a.model_version}", event_attrs(a)
            )
        return t

    def request_chunks(self, step: RequestChunks) -> None:
        self.intake.request_chunks(step.digest, step.indices)

    def verify(self, step: Verify) -> None:
        t = self.intake.transfers[step.digest]
        assert t.download is not None
        # Sample inputs are part of the model's fetch: they move no update on their own.
        for wanting in [] if t.sample else self._wanting(step.digest):
            self._advance(wanting, UpdateEvent.FETCHED)
        self.artifacts.finalize(t.download, sample=t.sample)
        self.intake.transfers.pop(step.digest)
        self.installed.add(step.digest)
        refused = ",".join(f"{reason}:{n}" for reason, n in sorted(t.refused.items())) or "none"
        log.info(
            "artifact verified device=%s digest=%s chunks=%d broadcast=%d requested=%d resumed=%d "
            "broadcast_refused=%s",
            self.device_id,
            step.digest[:12],
            t.download.chunks,
            t.from_broadcast,
            t.from_requests,
            t.resumed,
            refused,
        )

    def activate(self, step: Activate) -> None:
        """Stage (load, smoke inference) while the old model serves, then swap and start probation."""
        a = step.assignment
        crashed = self._crash_limit(a)
        if crashed is not None:
            self._fail_digest(a.digest, crashed)
            return
        self._advance(a, UpdateEvent.VERIFIED)
        serving = self.pool.get(a.tenant)
        held = self.pool.held(a.tenant)
        loaded = False
        try:
            if serving is not None and serving.digest == a.digest:
                model = serving.model
            elif held is not None and held.digest == a.digest:
                model = held.model
            else:
                # The model serving now is the rollback copy: held (counted against the memory
                # budget, never unloaded) before the new one loads, so the new one must fit beside it.
                self.pool.hold(a.tenant)
                model = self._load(a)
            loaded = True
            model.run(self._smoke_inputs(a, model))
        except (AgentError, OSError) as exc:
            # Nothing was swapped: the old model never stopped serving.
            self.pool.release(a.tenant)
            self._fail_digest(a.digest, f"staging failed: {exc}")
            if not loaded and not isinstance(exc, MemoryBudgetExceeded):
                # A model that loaded is sound (its digest was checked): what failed is its inputs
                # (the sample, or inputs made up without one), and one refused for want of memory
                # is sound too. Either is kept, so the generation that fixes it fetches nothing.
                self._drop_unloadable(a.digest)
            return
        try:
            self._advance(a, UpdateEvent.STAGED)
            ts = self.state.tenants.get(a.tenant, TenantState())
            previous = ts.active if ts.active and ts.active.assignment.digest != a.digest else ts.previous
            path = str(self.artifacts.model_path(a.digest, a.format))
            inferences, errors = self.probe(a.tenant, a.model_name, a.model_version)
            # The update record goes on (its crashes still count), now on probation.
            activated = self.state.updates[a.tenant]
            probation = replace(
                activated,
                state=advance(activated.state, UpdateEvent.ACTIVATED),
                reason="",
                probation_until=self.clock() + a.probation_s,
                base_inferences=inferences,
                base_errors=errors,
            )
            state = self.state.with_tenant(a.tenant, TenantState(Installed(a, path), previous))
            self._save(state.with_failure(None, a.digest).with_update(a.tenant, probation))
        except DiskFull:
            self._unstage(a)
            raise
        self._maybe_die(UpdateState.PROBATION)
        self._serve(a, model, hold_previous=True)
        log.info(
            "model activated device=%s tenant=%s model=%s version=%s digest=%s",
            self.device_id,
            a.tenant,
            a.model_name,
            a.model_version,
            a.digest[:12],
        )
        self.emit("model_activated", "info", f"{a.model_name} {a.model_version} is serving", event_attrs(a))

    def _smoke_inputs(self, a: Assignment, model: LoadedModel) -> dict[str, np.ndarray]:
        """The version's sample inputs, else inputs made from its signature (zeros without one)."""
        sample = self.artifacts.sample_path(a.sample_digest) if a.sample_digest else None
        return staging_inputs(model.inputs, a.signature, sample)

    def _unstage(self, a: Assignment) -> None:
        """A full disk refused the write that would let the staged model serve: nothing was
        swapped, so the update goes back to ``stage`` (in memory; state.json has it there or
        in ``activate``, which rolls back) and stages again once space is back."""
        self.pool.release(a.tenant)
        update = self.state.updates.get(a.tenant)
        if update is not None and update.assignment.digest == a.digest:
            staged = replace(update, state=advance(update.state, UpdateEvent.NOT_SWAPPED))
            self._save(self.state.with_update(a.tenant, staged), deferrable=True)

    def commit(self, step: Commit) -> None:
        update = self.state.updates[step.tenant]
        self._advance(update.assignment, UpdateEvent.PROBATION_PASSED)
        released = self.pool.release(step.tenant)
        self._end(step.tenant, UpdateEvent.COMMITTED, step.reason)
        if released is not None:
            log.info(
                "previous model released device=%s tenant=%s version=%s",
                self.device_id,
                step.tenant,
                released.model_version,
            )

    def rollback(self, step: RollBack) -> None:
        """Serve the previous model again (kept loaded, or from disk after a restart).

        The previous model is the tenant's last committed one; a first install has
        none, and the tenant is left without a model until a newer one is active.
        """
        update = self.state.updates[step.tenant]
        a = update.assignment
        # A rollback finishes even when the disk is full: its writes wait in memory.
        self._advance(a, step.cause, step.reason, deferrable=True)
        superseded = step.cause is UpdateEvent.SUPERSEDED
        ts = self.state.tenants.get(step.tenant)
        if ts is not None and ts.active is not None and ts.active.assignment.digest == a.digest:
            back = ts.previous
            held = self.pool.held(step.tenant)
            if back is None:
                self._save(self.state.with_tenant(step.tenant, None), deferrable=True)
                self.pool.remove(step.tenant)
            else:
                ready = held is not None and held.digest == back.assignment.digest
                model = held.model if held is not None and ready else self._load(back.assignment)
                self._save(self.state.with_tenant(step.tenant, TenantState(back, None)), deferrable=True)
                self._serve(back.assignment, model)
        self.pool.release(step.tenant)
        reason = f"rolled back: {step.reason}"
        failure = Failure(a.digest, reason, self.state.desired_generation)
        self._save(self.state.with_failure(failure), deferrable=True)
        self._end(step.tenant, UpdateEvent.ROLLED_BACK, step.reason, superseded)
        self.emit("model_rolled_back", "warning" if superseded else "error", reason, event_attrs(a))

    def deactivate(self, step: Deactivate) -> None:
        """Stop serving a tenant the controller no longer assigns.

        An update of the tenant still going ends first, so the controller hears its
        outcome (``rolled_back`` on probation, ``failed`` before it served); the removal
        is the controller's decision, not a fault of the model, hence a warning. One in
        activate, rollback or commit cannot be here (those finish in one step, or on
        start through resume()), so the table refuses it loudly.
        """
        update = self.state.updates.get(step.tenant)
        if update is not None and (machine := update.state) not in FINAL:
            during = "on probation" if machine is UpdateState.PROBATION else f"in {machine.value}"
            self._end(step.tenant, UpdateEvent.REMOVED, f"tenant removed while {during}", superseded=True)
        # Removing the tenant from the pool releases the previous model it held too.
        self._save(self.state.with_tenant(step.tenant, None).with_update(step.tenant, None))
        self.pool.remove(step.tenant)
        log.info("tenant removed device=%s tenant=%s", self.device_id, step.tenant)

    def mark_applied(self, step: MarkApplied) -> None:
        self._save(replace(self.state, applied_generation=step.generation))
        log.info("converged device=%s generation=%d", self.device_id, step.generation)

    def collect_garbage(self, step: CollectGarbage) -> None:
        for digest in step.digests:
            self.intake.transfers.pop(digest, None)
            self.artifacts.discard(digest)
            self.artifacts.remove_model(digest)
            self.installed.discard(digest)
            log.info("artifact removed device=%s digest=%s", self.device_id, digest[:12])

    # -- helpers --------------------------------------------------------------

    def _drop_unloadable(self, digest: str) -> None:
        """Remove a model file that does not load, so a later generation fetches it afresh."""
        for ts in self.state.tenants.values():
            if any(i is not None and i.assignment.digest == digest for i in (ts.active, ts.previous)):
                return
        self.artifacts.remove_model(digest)
        self.installed.discard(digest)

    def _load(self, a: Assignment) -> Any:
        # Through the pool: tenants on the same artifact share one copy, within the memory budget.
        return self.pool.load(a.digest, self.artifacts.model_path(a.digest, a.format), a.runtime, a.format)

    def _serve(self, a: Assignment, model: Any, hold_previous: bool = False) -> None:
        path = self.artifacts.model_path(a.digest, a.format)
        runtime = a.runtime or "onnxruntime"
        signature = a.signature
        if signature is not None:
            # In the served file's own tensor names (a converted variant may rename them).
            signature = signature.bound([i.name for i in model.inputs], [o.name for o in model.outputs])
        serving = ServingModel(
            a.tenant, a.model_name, a.model_version, a.digest, runtime, path, model, signature
        )
        self.pool.put(serving, hold_previous=hold_previous)

    def _wanting(self, digest: str) -> list[Assignment]:
        """The assignments whose update this transfer advances.

        A tenant still serving another update's model is left out: the planner ends
        that update first, and the tenant's own update starts when it stages.
        """
        desired = self.state.desired

        def free(a: Assignment) -> bool:
            u = self.state.updates.get(a.tenant)
            return u is None or u.assignment.digest == digest or u.state in FINAL | ENTRY

        return [a for a in desired.assignments if a.digest == digest and free(a)] if desired else []

    def _advance(self, a: Assignment, event: UpdateEvent, reason: str = "", deferrable: bool = False) -> None:
        """Persist the tenant's update in the state the table gives for ``event`` (agent.update_machine),
        before that state acts.

        A tenant has one update at a time. One for another artifact that has not
        served yet ends here (``failed``, superseded by ``a``); one whose model
        serves must have been committed or rolled back by the planner first, else
        its record (and with it the rollback target) would be lost: that is a bug.
        """
        current = self.state.updates.get(a.tenant)
        same = current is not None and current.assignment == a
        if current is not None and not same and current.state not in FINAL:
            self._supersede(current, a)
            current = self.state.updates.get(a.tenant)
        state = advance(current.state if current is not None and same else None, event)
        update = Update(a, state, reason)
        if current is not None and same:
            update = replace(current, state=state, reason=reason or current.reason)
        elif current is not None and current.assignment.digest == a.digest:
            # The same artifact for the tenant, assigned anew: its crashes still count.
            update = replace(update, crashes=current.crashes, crashed_in=current.crashed_in)
        if state is UpdateState.COMMIT:
            # The update proved itself: the crashes counted before are history.
            update = replace(update, crashes=0, crashed_in=())
        self._save(self.state.with_update(a.tenant, update), deferrable)
        log.info(
            "update state device=%s tenant=%s model=%s version=%s state=%s",
            self.device_id,
            a.tenant,
            a.model_name,
            a.model_version,
            state.value,
        )
        self._maybe_die(state)

    def _supersede(self, update: Update, newer: Assignment) -> None:
        old = update.assignment
        machine = update.state
        if old.digest == newer.digest:
            # The same artifact assigned anew: the newer assignment's update takes over.
            log.info(
                "update reassigned device=%s tenant=%s model=%s version=%s state=%s",
                self.device_id,
                old.tenant,
                newer.model_name,
                newer.model_version,
                machine.value,
            )
            return
        if machine not in ENTRY:
            raise UnhandledTransition(
                f"update of {old.model_name} {old.model_version} for tenant {old.tenant} is in "
                f"{machine.value}: it must end before {newer.model_name} {newer.model_version} starts"
            )
        reason = f"superseded by {newer.model_name} {newer.model_version} before it served"
        self._end(old.tenant, UpdateEvent.SUPERSEDED, reason, superseded=True)

    def _end(self, tenant: str, event: UpdateEvent, reason: str, superseded: bool = False) -> None:
        """The tenant's update ends where the table takes it on ``event`` (an ending state)."""
        update = self.state.updates[tenant]
        a = update.assignment
        state = next_state(update.state, event)
        if state not in FINAL:
            raise UnhandledTransition(f"{event.value} does not end an update in {update.state.value}")
        # An ending is recorded even on a full disk (in memory until space is back).
        ended = replace(update, state=state, reason=reason)
        self._save(self.state.with_update(tenant, ended), deferrable=True)
        outcome = OUTCOMES[state]
        # A superseded update is the controller changing its mind, not a fault of the model.
        expected = outcome == "succeeded" or superseded
        level = logging.INFO if expected else logging.WARNING
        log.log(
            level,
            "update outcome device=%s tenant=%s model=%s version=%s outcome=%s reason=%r",
            self.device_id,
            tenant,
            a.model_name,
            a.model_version,
            outcome,
            reason,
        )
        severity = "info" if outcome == "succeeded" else "warning" if superseded else "error"
        attrs = {**event_attrs(a), "outcome": outcome}
        self.emit("update_outcome", severity, f"{a.model_name} {a.model_version}: {outcome}: {reason}", attrs)

    def _maybe_die(self, state: UpdateState) -> None:
        if self.kill_at == state.value:
            log.warning("fault injection: SIGKILL in update state %s device=%s", state.value, self.device_id)
            os.kill(os.getpid(), signal.SIGKILL)

    def _save(self, state: DeviceState, deferrable: bool = False) -> None:
        """Persist ``state``, then make it current.

        On a full disk a forward move (``deferrable`` false) raises :class:`DiskFull` and
        does not happen; an ending, a rollback, a desired state taken in, or anything at
        start is made current in memory anyway and written once space is back.
        """
        try:
            self.states.save(state)
        except DiskFull as exc:
            self.space.hit(str(exc))
            if not (deferrable or self._booting):
                raise
            log.warning(
                "state kept in memory until disk space is back device=%s error=%s", self.device_id, exc
            )
            self.unsaved = True
        else:
            self.unsaved = False
        self.state = state
