"""The I/O around the rollout engine: load a run, snapshot the fleet, execute steps.

Each executor runs inside the store transaction that also appends the step and
its reason to ``rollout_events``: the transition is on disk before anything
leaves the controller. Desired states are published only after that commit; a
controller killed in between republishes every stored desired state when its
MQTT session comes up, so nothing is lost and nothing is sent twice by the
engine (the next plan sees the stored desired state and skips the device).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode
from edgefleet_proto.tenancy import tenant_or_default

from controller.fleet import Reported
from controller.rollout_engine import (
    Action,
    AwaitApproval,
    Complete,
    DeviceRolloutStatus,
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
    shadow_tenant,
)
from controller.rollout_plans import Plan
from controller.store import Store

log = logging.getLogger(__name__)

# How far back telemetry of the previous version counts as a device's baseline.
BASELINE_LOOKBACK_S = 900.0
BASELINE_WINDOWS = 100

_PHASES: dict[str, DeviceRolloutStatus] = {
    "downloading": "downloading",
    "verifying": "verifying",
    "loading": "loading",
    "probation": "probation",
    "active": "active",
    "failed": "failed",
}


def decode_desired(blob: bytes | None) -> fleet_pb2.DesiredState | None:
    if blob is None:
        return None
    try:
        return decode_as(fleet_pb2.DesiredState, bytes(blob))
    except PayloadError:
        log.error("stored desired state is unreadable; replacing it")
        return None


def _assignment(blob: bytes | None) -> fleet_pb2.ModelAssignment | None:
    return decode_as(fleet_pb2.ModelAssignment, bytes(blob)) if blob is not None else None


def load_run(store: Store, rollout_id: str) -> Run | None:
    row = store.query_one(
        "SELECT r.tenant, u.* FROM rollout_runs u JOIN rollouts r ON r.id = u.rollout_id WHERE u.rollout_id = ?",
        (rollout_id,),
    )
    if row is None:
        return None
    members = store.query(
        "SELECT * FROM rollout_members WHERE rollout_id = ? ORDER BY wave, device_id", (rollout_id,)
    )
    return Run(
        id=rollout_id,
        tenant=row["tenant"],
        plan=Plan.from_json(json.loads(row["plan"])),
        state=State(row["state"]),
        members=tuple(
            Member(
                device_id=m["device_id"],
                wave=m["wave"],
                wanted=decode_as(fleet_pb2.ModelAssignment, bytes(m["wanted"])),
                previous=_assignment(m["previous"]),
                set_at=m["set_at"],
                shadow_set_at=m["shadow_set_at"],
            )
            for m in members
        ),
        wave=row["wave"],
        soak_started_at=row["soak_started_at"],
        promoted=bool(row["promoted"]),
        approved_wave=row["approved_wave"],
        reason=row["reason"],
        phase=Phase(row["phase"]),
    )


def device_status(tenant: str, digest: str, reported: Reported | None) -> tuple[DeviceRolloutStatus, str]:
    """Where one device is with (tenant, digest), from its last reported state."""
    if reported is None:
        return "pending", "the device has not reported yet"
    for model in reported.models:
        if model.tenant == tenant and model.artifact_digest == digest:
            status = _PHASES.get(model.phase)
            if status is None:
                return "pending", f"reported phase {model.phase}"
            if status == "failed":
                return status, model.error or "the device reported a failure without a reason"
            if status == "downloading" and model.bytes_total:
                return status, f"{model.bytes_have}/{model.bytes_total} bytes"
            return status, ""
    return "pending", "the device has not picked up this version yet"


def desired_refusal(store: Store, device_id: str, generation: int, since: float) -> str | None:
    """Why the device refused its desired state ``generation``, sent at ``since``, if it said so.

    A device that does not trust the controller's signing key (provisioned for another
    controller, say) refuses the whole state and goes on reporting the previous one: its
    ``payload_rejected`` event (``topic=desired``, ``generation``) is the only word of it."""
    rows = store.query(
        "SELECT message, attributes FROM events WHERE device_id = ? AND kind = 'payload_rejected'"
        " AND received_at >= ? ORDER BY id DESC LIMIT 20",
        (device_id, since),
    )
    for r in rows:
        try:
            attributes = json.loads(r["attributes"])
        except ValueError:
            continue
        if attributes.get("topic") == "desired" and attributes.get("generation") == str(generation):
            return str(r["message"])
    return None


def member_status(
    store: Store, run: Run, m: Member, reported: Reported | None, desired_generation: int
) -> tuple[DeviceRolloutStatus, str]:
    """Where a member is with the rollout's version: what it reported, or that it refused the state."""
    status, detail = device_status(run.tenant, m.wanted.artifact_digest, reported)
    if status == "failed" and reported is not None:
        retry = store.query_one(
            "SELECT generation FROM rollout_retries WHERE rollout_id = ? AND device_id = ?",
            (run.id, m.device_id),
        )
        if retry is not None and reported.desired_generation < retry["generation"]:
            return (
                "pending",
                f"sent again (desired generation {retry['generation']}) after it failed: {detail}",
            )
    if status == "pending" and m.set_at is not None:
        refusal = desired_refusal(store, m.device_id, desired_generation, m.set_at)
        if refusal is not None:
            return "failed", f"the device refused its desired state: {refusal}"
    return status, detail


def active_digest(tenant: str, reported: Reported | None) -> str | None:
    for model in reported.models if reported is not None else []:
        if model.tenant == tenant and model.phase == "active":
            return model.artifact_digest
    return None


def _stats(rows: list[dict[str, Any]], tenant: str, a: fleet_pb2.ModelAssignment | None) -> VersionStats:
    """Counts summed over the windows; p95 as the median of the windows' p95.

    A window's p95 is nearly its maximum, and a device busy with something else for a
    few seconds (an update, a restart) spikes one or two windows: the median over the
    windows keeps such a spike from deciding the latency gate.
    """
    if a is None:
        return VersionStats()
    inferences = errors = 0
    p95s: list[float] = []
    for row in rows:
        for m in json.loads(row["models"]):
            if (tenant_or_default(m["tenant"]), m["model_name"], m["model_version"]) != (
                tenant,
                a.model_name,
                a.model_version,
            ):
                continue
            inferences += m["inference_count"]
            errors += m["error_count"]
            if m["inference_count"] > m["error_count"] and m["latency_p95_ms"] > 0:
                p95s.append(m["latency_p95_ms"])
    return VersionStats(inferences, errors, statistics.median(p95s) if p95s else 0.0)


def mean_confidence(histogram: fleet_pb2.Histogram) -> tuple[int, float]:
    """(samples, mean) from a confidence histogram: bins between the edges, plus one below and above."""
    edges = list(histogram.edges)
    counts = list(histogram.counts)
    if len(counts) != len(edges) + 1 or not sum(counts):
        return 0, 0.0
    bounds = [0.0, *edges, 1.0]
    mids = [(bounds[i] + bounds[i + 1]) / 2 for i in range(len(counts))]
    total = sum(counts)
    return total, sum(m * c for m, c in zip(mids, counts, strict=True)) / total


def _with_sketches(
    store: Store,
    stats: VersionStats,
    device_id: str,
    tenant: str,
    a: fleet_pb2.ModelAssignment | None,
    span: str,
    params: tuple[float, ...],
) -> VersionStats:
    if a is None:
        return stats
    rows = store.query(
        "SELECT sketch FROM drift_sketches WHERE device_id = ? AND tenant = ? AND model_name = ?"
        f" AND model_version = ? AND {span} ORDER BY received_at DESC LIMIT ?",
        (device_id, tenant, a.model_name, a.model_version, *params, BASELINE_WINDOWS),
    )
    samples, weighted = 0, 0.0
    classes: list[int] = []
    for r in rows:
        try:
            sketch = decode_as(fleet_pb2.DriftSketch, bytes(r["sketch"]))
        except PayloadError:
            continue
        n, mean = mean_confidence(sketch.confidence)
        samples += n
        weighted += n * mean
        counts = list(sketch.class_counts)
        classes += [0] * (len(counts) - len(classes))
        for i, c in enumerate(counts):
            classes[i] += c
    mean = weighted / samples if samples else 0.0
    return replace(stats, confidence_samples=samples, confidence_mean=mean, classes=tuple(classes))


def shadow_view(rows: list[dict[str, Any]], tenant: str, candidate: fleet_pb2.ModelAssignment) -> ShadowView:
    """The candidate's shadow stats over the windows, means weighted by the samples compared."""
    compared = 0
    agreed = deviation = 0.0
    for row in rows:
        for s in json.loads(row["shadows"]):
            if (tenant_or_default(s["tenant"]), s["candidate_model_name"], s["candidate_model_version"]) != (
                tenant,
                candidate.model_name,
                candidate.model_version,
            ):
                continue
            compared += s["compared"]
            agreed += s["top1_agreement"] * s["compared"]
            deviation += s["mean_abs_deviation"] * s["compared"]
    if not compared:
        return ShadowView()
    return ShadowView(compared, agreed / compared, deviation / compared)


def snapshot(store: Store, run: Run, now: float) -> dict[str, DeviceView]:
    """Every member as the controller knows it now; telemetry only for the current wave."""
    rows = store.query(
        "SELECT d.device_id, d.online, d.desired_generation, d.desired, d.reported FROM rollout_members m"
        " JOIN devices d ON d.device_id = m.device_id WHERE m.rollout_id = ?",
        (run.id,),
    )
    by_id = {r["device_id"]: r for r in rows}
    views: dict[str, DeviceView] = {}
    for m in run.members:
        r = by_id[m.device_id]
        reported = Reported.from_json(r["reported"]) if r["reported"] else None
        status, detail = member_status(store, run, m, reported, r["desired_generation"])
        new = baseline = VersionStats()
        shadow_status, _ = device_status(shadow_tenant(run.tenant), m.wanted.artifact_digest, reported)
        shadow = ShadowView()
        shadow_stats = VersionStats()
        current = m.wave == run.wave and run.state is State.RUNNING
        if current and run.phase is Phase.SHADOW and m.shadow_set_at is not None:
            rows = store.query(
                "SELECT shadows, models FROM telemetry WHERE device_id = ? AND received_at >= ?",
                (m.device_id, m.shadow_set_at),
            )
            shadow = shadow_view(rows, run.tenant, m.wanted)
            # The agent counts the candidate's inferences under the shadow tenant it was assigned to.
            shadow_stats = _stats(rows, shadow_tenant(run.tenant), m.wanted)
        if current and run.phase is Phase.LIVE:
            since = m.set_at if m.set_at is not None else now
            after = store.query(
                "SELECT models FROM telemetry WHERE device_id = ? AND received_at >= ?", (m.device_id, since)
            )
            before = store.query(
                "SELECT models FROM telemetry WHERE device_id = ? AND received_at < ? AND received_at >= ?"
                " ORDER BY received_at DESC LIMIT ?",
                (m.device_id, since, since - BASELINE_LOOKBACK_S, BASELINE_WINDOWS),
            )
            new = _stats(after, run.tenant, m.wanted)
            baseline = _stats(before, run.tenant, m.previous)
            gates = run.plan.gates
            if gates.min_confidence_ratio is not None or gates.max_prediction_psi is not None:
                new = _with_sketches(
                    store, new, m.device_id, run.tenant, m.wanted, "received_at >= ?", (since,)
                )
                baseline = _with_sketches(
                    store,
                    baseline,
                    m.device_id,
                    run.tenant,
                    m.previous,
                    "received_at < ? AND received_at >= ?",
                    (since, since - BASELINE_LOOKBACK_S),
                )
        views[m.device_id] = DeviceView(
            device_id=m.device_id,
            online=bool(r["online"]),
            desired_generation=r["desired_generation"],
            desired=decode_desired(r["desired"]),
            status=status,
            detail=detail,
            new=new,
            baseline=baseline,
            shadow_status=shadow_status,
            shadow=shadow,
            shadow_stats=shadow_stats,
        )
    return views


@dataclass(frozen=True)
class Outgoing:
    device_id: str
    payload: bytes


def record(
    store: Store, run_id: str, kind: str, wave: int, state: str, reason: str, device_id: str = ""
) -> None:
    store.execute(
        "INSERT INTO rollout_events (rollout_id, at, kind, wave, device_id, state, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (run_id, time.time(), kind, wave, device_id, state, reason),
    )


def set_state(store: Store, rollout_id: str, state: State, reason: str, at: float, **columns: Any) -> None:
    """A rollout run's state and reason, when they changed, and any other of its columns."""
    sets = ", ".join(f"{c} = ?" for c in ("state", "reason", "updated_at", *columns))
    store.execute(
        f"UPDATE rollout_runs SET {sets} WHERE rollout_id = ?",
        (state.value, reason, at, *columns.values(), rollout_id),
    )


def _set_state(store: Store, run: Run, state: State, reason: str, **columns: Any) -> None:
    set_state(store, run.id, state, reason, time.time(), **columns)


def _set_desired(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
    assert isinstance(step, SetDesired)
    # Compare-and-set on the generation: a snapshot gone stale changes nothing.
    changed = store.execute(
        "UPDATE devices SET desired_generation = ?, desired = ? WHERE device_id = ? AND desired_generation = ?",
        (step.desired.generation, encode(step.desired), step.device_id, step.desired.generation - 1),
    )
    if not changed:
        return []
    if not step.revert:
        column = "shadow_set_at" if step.shadow else "set_at"
        store.execute(
            f"UPDATE rollout_members SET {column} = ? WHERE rollout_id = ? AND device_id = ?",
            (now, run.id, step.device_id),
        )
    kind = "revert_desired" if step.revert else "set_shadow" if step.shadow else "set_desired"
    record(store, run.id, kind, run.wave, run.state.value, step.reason, step.device_id)
    return [Outgoing(step.device_id, encode(step.desired))]


def _start_wave(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
    assert isinstance(step, StartWave)
    phase = Phase.SHADOW if run.plan.shadow is not None else Phase.LIVE
    _set_state(
        store,
        run,
        State.RUNNING,
        step.reason,
        wave=step.wave,
        soak_started_at=None,
        promoted=0,
        phase=phase.value,
    )
    record(store, run.id, Action.START_WAVE.value, step.wave, State.RUNNING.value, step.reason)
    return []


def _go_live(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
    assert isinstance(step, GoLive)
    _set_state(store, run, run.state, step.reason, soak_started_at=None, phase=Phase.LIVE.value)
    record(store, run.id, Action.GO_LIVE.value, step.wave, run.state.value, step.reason)
    return []


def _start_soak(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
    assert isinstance(step, StartSoak)
    _set_state(store, run, run.state, step.reason, soak_started_at=now)
    record(store, run.id, Action.START_SOAK.value, step.wave, run.state.value, step.reason)
    return []


def _transition(state: State, kind: Action) -> Callable[[Store, Run, Step, float], list[Outgoing]]:
    def execute(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
        assert isinstance(step, Pause | RollBack | AwaitApproval)
        _set_state(store, run, state, step.reason)
        record(store, run.id, kind.value, run.wave, state.value, step.reason)
        return []

    return execute


def _complete(store: Store, run: Run, step: Step, now: float) -> list[Outgoing]:
    assert isinstance(step, Complete)
    _set_state(store, run, step.state, step.reason)
    record(store, run.id, Action.COMPLETE.value, run.wave, step.state.value, step.reason)
    return []


EXECUTORS: dict[Action, Callable[[Store, Run, Step, float], list[Outgoing]]] = {
    Action.SET_DESIRED: _set_desired,
    Action.START_WAVE: _start_wave,
    Action.START_SOAK: _start_soak,
    Action.GO_LIVE: _go_live,
    Action.PAUSE: _transition(State.PAUSED, Action.PAUSE),
    Action.AWAIT_APPROVAL: _transition(State.AWAITING_APPROVAL, Action.AWAIT_APPROVAL),
    Action.ROLL_BACK: _transition(State.ROLLING_BACK, Action.ROLL_BACK),
    Action.COMPLETE: _complete,
}
