"""Rollouts: a model version sent to explicit devices, all at once.

The planner is pure: :func:`plan` turns a rollout and a snapshot of the
targeted devices into steps (today one kind, ``set_desired``); executors in
:data:`ACTIONS` persist each step inside the rollout's transaction, and the new
desired states are published (retained) only after the commit. Per-device and
rollout status are never stored: they are derived from what the devices
report, matched by (tenant, artifact digest).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode

from controller.errors import InvalidInputError, RolloutNotFound, UnknownTargets
from controller.fleet import Fleet, Reported
from controller.registry import FORMAT, Registry
from controller.store import Store

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
DEFAULT_TENANT = "default"
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

DeviceRolloutStatus = Literal["pending", "downloading", "verifying", "loading", "active", "failed"]
RolloutStatus = Literal["in_progress", "succeeded", "failed"]
_PHASES: dict[str, DeviceRolloutStatus] = {
    "downloading": "downloading",
    "verifying": "verifying",
    "loading": "loading",
    "active": "active",
    "failed": "failed",
}


class DesiredPublisher(Protocol):
    def publish_desired(self, device_id: str, payload: bytes) -> None: ...


@dataclass(frozen=True)
class RolloutSpec:
    id: str
    model: str
    version: str
    tenant: str
    digest: str
    size: int


@dataclass(frozen=True)
class DeviceSnapshot:
    device_id: str
    desired_generation: int
    desired: fleet_pb2.DesiredState | None


@dataclass(frozen=True)
class SetDesired:
    device_id: str
    desired: fleet_pb2.DesiredState
    action: str = "set_desired"


Step = SetDesired


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    status: DeviceRolloutStatus
    detail: str
    updated_at: float


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    version: str
    tenant: str
    digest: str
    status: RolloutStatus
    created_at: float
    devices: list[RolloutDevice]


def assignment(spec: RolloutSpec) -> fleet_pb2.ModelAssignment:
    return fleet_pb2.ModelAssignment(
        tenant=spec.tenant,
        model_name=spec.model,
        model_version=spec.version,
        artifact_digest=spec.digest,
        artifact_size=spec.size,
        format=FORMAT,
        runtime=RUNTIME,
        rollout_id=spec.id,
    )


def plan(spec: RolloutSpec, devices: Sequence[DeviceSnapshot], now_ms: int) -> list[Step]:
    """One ``set_desired`` per device whose desired state does not already carry this rollout."""
    wanted = assignment(spec)
    steps: list[Step] = []
    for device in devices:
        current = list(device.desired.models) if device.desired is not None else []
        if wanted in current:
            continue
        models = [m for m in current if m.tenant != spec.tenant] + [wanted]
        desired = fleet_pb2.DesiredState(
            device_id=device.device_id,
            generation=device.desired_generation + 1,
            models=sorted(models, key=lambda m: m.tenant),
            issued_at_ms=now_ms,
        )
        steps.append(SetDesired(device_id=device.device_id, desired=desired))
    return steps


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


def rollout_status(statuses: Sequence[DeviceRolloutStatus]) -> RolloutStatus:
    """Succeeded when every device is active; failed once every device has finished and one failed."""
    if statuses and all(s == "active" for s in statuses):
        return "succeeded"
    if statuses and all(s in ("active", "failed") for s in statuses):
        return "failed"
    return "in_progress"


def _decode_desired(blob: bytes | None) -> fleet_pb2.DesiredState | None:
    if blob is None:
        return None
    try:
        return decode_as(fleet_pb2.DesiredState, bytes(blob))
    except PayloadError:
        log.error("stored desired state is unreadable; replacing it")
        return None


def _set_desired(store: Store, step: Step) -> None:
    store.execute(
        "UPDATE devices SET desired_generation = ?, desired = ? WHERE device_id = ?",
        (step.desired.generation, encode(step.desired), step.device_id),
    )


ACTIONS: dict[str, Callable[[Store, Step], None]] = {"set_desired": _set_desired}


class Rollouts:
    def __init__(self, store: Store, registry: Registry, fleet: Fleet) -> None:
        self.store = store
        self.registry = registry
        self.fleet = fleet
        self.publisher: DesiredPublisher | None = None

    def create(
        self, model: str, version: str, device_ids: Sequence[str], tenant: str = DEFAULT_TENANT
    ) -> Rollout:
        if not _TENANT.match(tenant):
            raise InvalidInputError(f"invalid tenant {tenant!r}: use 1-64 letters, digits, '_', '.', '-'")
        targets = list(dict.fromkeys(device_ids))
        if not targets:
            raise InvalidInputError("a rollout needs at least one device")
        found = self.registry.find(model, version)
        problems = []
        if found is None:
            problems.append(f"unknown model version {model} {version}")
        known = self.fleet.known(targets)
        missing = [d for d in targets if d not in known]
        if missing:
            problems.append(f"unknown devices: {', '.join(missing)}")
        if found is None or missing:
            raise UnknownTargets("; ".join(problems))
        spec = RolloutSpec(
            id=uuid.uuid4().hex,
            model=model,
            version=version,
            tenant=tenant,
            digest=found.digest,
            size=found.size,
        )
        now = time.time()
        published: list[SetDesired] = []
        with self.store.transaction() as tx:
            snapshots = [self._snapshot(d) for d in targets]
            steps = plan(spec, snapshots, int(now * 1000))
            tx.execute(
                "INSERT INTO rollouts (id, model, version, tenant, digest, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (spec.id, model, version, tenant, spec.digest, now),
            )
            generations = {s.device_id: s.desired_generation for s in snapshots}
            for step in steps:
                ACTIONS[step.action](tx, step)
                generations[step.device_id] = step.desired.generation
                published.append(step)
            for device_id in targets:
                tx.execute(
                    "INSERT INTO rollout_devices (rollout_id, device_id, generation) VALUES (?, ?, ?)",
                    (spec.id, device_id, generations[device_id]),
                )
        log.info(
            "rollout created rollout=%s model=%s version=%s tenant=%s digest=%s devices=%s",
            spec.id, model, version, tenant, spec.digest, ",".join(targets),
        )  # fmt: skip
        for step in published:
            log.info(
                "desired state set device=%s generation=%d rollout=%s model=%s version=%s",
                step.device_id, step.desired.generation, spec.id, model, version,
            )  # fmt: skip
            if self.publisher is not None:
                self.publisher.publish_desired(step.device_id, encode(step.desired))
        return self.get(spec.id)

    def _snapshot(self, device_id: str) -> DeviceSnapshot:
        row = self.store.query_one(
            "SELECT desired_generation, desired FROM devices WHERE device_id = ?", (device_id,)
        )
        assert row is not None  # checked before the transaction; devices are never deleted
        return DeviceSnapshot(device_id, row["desired_generation"], _decode_desired(row["desired"]))

    def get(self, rollout_id: str) -> Rollout:
        row = self.store.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if row is None:
            raise RolloutNotFound(f"unknown rollout {rollout_id}")
        members = self.store.query(
            "SELECT rd.device_id, d.reported, d.reported_received_at, d.desired FROM rollout_devices rd"
            " JOIN devices d ON d.device_id = rd.device_id WHERE rd.rollout_id = ? ORDER BY rd.device_id",
            (rollout_id,),
        )
        devices = []
        for m in members:
            reported = Reported.from_json(m["reported"]) if m["reported"] else None
            status, detail = device_status(row["tenant"], row["digest"], reported)
            if status == "pending":
                detail = self._superseded(rollout_id, row["tenant"], m["desired"]) or detail
            matched = status != "pending" and m["reported_received_at"] is not None
            devices.append(
                RolloutDevice(
                    device_id=m["device_id"],
                    status=status,
                    detail=detail,
                    updated_at=m["reported_received_at"] if matched else row["created_at"],
                )
            )
        return Rollout(
            id=row["id"],
            model=row["model"],
            version=row["version"],
            tenant=row["tenant"],
            digest=row["digest"],
            status=rollout_status([d.status for d in devices]),
            created_at=row["created_at"],
            devices=devices,
        )

    @staticmethod
    def _superseded(rollout_id: str, tenant: str, blob: bytes | None) -> str:
        desired = _decode_desired(blob)
        for m in desired.models if desired is not None else []:
            if m.tenant == tenant and m.rollout_id != rollout_id:
                return f"superseded by rollout {m.rollout_id}"
        return ""

    def all(self) -> list[Rollout]:
        rows = self.store.query("SELECT id FROM rollouts ORDER BY created_at DESC, id")
        return [self.get(r["id"]) for r in rows]
