"""The device state that must survive a power cut, persisted as JSON by atomic writes.

Per tenant the model being served (``active``) and the one before it
(``previous``, kept on disk as the fallback), the newest desired state seen and
the generation fully applied, artifacts refused for good (with the reason
reported to the controller), and per tenant the update in progress or last
ended, in the state machine of :mod:`agent.update_machine`, with the number of
times the agent died while staging or serving it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import tenant_or_default

from agent.atomic import write_atomic
from agent.diskspace import refused_for_space
from agent.errors import StateError
from agent.signature import ModelSignature
from agent.update_machine import UpdateState

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class Assignment:
    """One tenant's model as the controller wants it (ModelAssignment without protobuf)."""

    tenant: str
    model_name: str
    model_version: str
    digest: str
    size: int = 0
    format: str = "onnx"
    runtime: str = "onnxruntime"
    rollout_id: str = ""
    probation_s: float = 0.0
    max_error_rate: float = 0.0
    # The version's sample inputs (an .npz fetched like the artifact) for the staging smoke
    # inference, and its signature; empty from an older controller.
    sample_digest: str = ""
    sample_size: int = 0
    signature: ModelSignature | None = None
    # The wave broadcast the model and its sample inputs can be taken from (agent.broadcast),
    # and the keys that open them, hex; empty: fetched by request only.
    wave_id: str = ""
    artifact_key: str = ""
    sample_key: str = ""

    @classmethod
    def from_proto(cls, m: fleet_pb2.ModelAssignment) -> Assignment:
        has_signature = m.HasField("model_signature") and bool(m.model_signature.inputs)
        wave = m.broadcast if m.HasField("broadcast") else fleet_pb2.WaveBroadcast()
        return cls(
            tenant=tenant_or_default(m.tenant),
            model_name=m.model_name,
            model_version=m.model_version,
            digest=m.artifact_digest,
            size=int(m.artifact_size),
            format=m.format or "onnx",
            runtime=m.runtime,
            rollout_id=m.rollout_id,
            probation_s=max(0.0, float(m.probation_s)),
            max_error_rate=max(0.0, float(m.max_error_rate)),
            sample_digest=m.sample_digest,
            sample_size=int(m.sample_size),
            signature=ModelSignature.from_proto(m.model_signature) if has_signature else None,
            wave_id=wave.wave_id,
            artifact_key=wave.artifact_key.hex(),
            sample_key=wave.sample_key.hex(),
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Assignment:
        """From its stored form; fields a state file written before them lacks take their defaults."""
        signature = doc.get("signature")
        return cls(**{**doc, "signature": ModelSignature.from_json(signature) if signature else None})


@dataclass(frozen=True)
class Desired:
    generation: int
    assignments: tuple[Assignment, ...]

    @classmethod
    def from_proto(cls, d: fleet_pb2.DesiredState) -> Desired:
        return cls(int(d.generation), tuple(Assignment.from_proto(m) for m in d.models))

    def for_tenant(self, tenant: str) -> Assignment | None:
        return next((a for a in self.assignments if a.tenant == tenant), None)


@dataclass(frozen=True)
class Installed:
    assignment: Assignment
    path: str


@dataclass(frozen=True)
class Failure:
    digest: str
    reason: str
    generation: int


@dataclass(frozen=True)
class Update:
    """One tenant's update in the state machine of :mod:`agent.update_machine`."""

    assignment: Assignment
    state: UpdateState
    reason: str = ""
    # Probation: its end on the monotonic clock and the version's totals when it began. Only
    # meaningful within one run of the agent: a restart during probation rolls back.
    probation_until: float = 0.0
    base_inferences: int = 0
    base_errors: int = 0
    # Times the agent died while this artifact was staging or serving for this tenant,
    # counted at the start after (the persisted state was still ``stage``, ``activate`` or
    # ``probation``), and in which of those states (each named once);
    # carried over while the tenant is assigned the same artifact, whatever the
    # generation, and cleared by a commit.
    crashes: int = 0
    crashed_in: tuple[UpdateState, ...] = ()

    def __post_init__(self) -> None:
        # Typed whatever it was made from: the persisted JSON holds the states' names.
        object.__setattr__(self, "state", UpdateState(self.state))
        object.__setattr__(self, "crashed_in", tuple(UpdateState(s) for s in self.crashed_in))

    def crashed(self) -> Update:
        """The update after one more death of the agent in its current state."""
        states = self.crashed_in if self.state in self.crashed_in else (*self.crashed_in, self.state)
        return replace(self, crashes=self.crashes + 1, crashed_in=states)


@dataclass(frozen=True)
class TenantState:
    active: Installed | None = None
    previous: Installed | None = None


@dataclass(frozen=True)
class DeviceState:
    desired: Desired | None = None
    applied_generation: int = 0
    tenants: dict[str, TenantState] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    updates: dict[str, Update] = field(default_factory=dict)

    @property
    def desired_generation(self) -> int:
        return self.desired.generation if self.desired else 0

    def with_tenant(self, tenant: str, ts: TenantState | None) -> DeviceState:
        tenants = dict(self.tenants)
        if ts is None:
            tenants.pop(tenant, None)
        else:
            tenants[tenant] = ts
        return replace(self, tenants=tenants)

    def with_failure(self, failure: Failure | None, digest: str = "") -> DeviceState:
        failures = dict(self.failures)
        if failure is None:
            failures.pop(digest, None)
        else:
            failures[failure.digest] = failure
        return replace(self, failures=failures)

    def with_update(self, tenant: str, update: Update | None) -> DeviceState:
        updates = dict(self.updates)
        if update is None:
            updates.pop(tenant, None)
        else:
            updates[tenant] = update
        return replace(self, updates=updates)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeviceState:
        if doc.get("version") != STATE_VERSION:
            raise StateError(f"state version {doc.get('version')!r} is not {STATE_VERSION}")

        def installed(x: dict[str, Any] | None) -> Installed | None:
            return Installed(Assignment.from_json(x["assignment"]), str(x["path"])) if x else None

        desired = doc.get("desired")
        return cls(
            desired=Desired(
                int(desired["generation"]), tuple(Assignment.from_json(a) for a in desired["assignments"])
            )
            if desired
            else None,
            applied_generation=int(doc.get("applied_generation", 0)),
            tenants={
                t: TenantState(installed(v.get("active")), installed(v.get("previous")))
                for t, v in doc.get("tenants", {}).items()
            },
            failures={d: Failure(**f) for d, f in doc.get("failures", {}).items()},
            updates={
                t: Update(
                    **{
                        **u,
                        "assignment": Assignment.from_json(u["assignment"]),
                        "crashed_in": tuple(u.get("crashed_in", ())),
                    }
                )
                for t, u in doc.get("updates", {}).items()
            },
        )


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> DeviceState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return DeviceState()
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc}") from None
        try:
            return DeviceState.from_json(json.loads(raw))
        except (ValueError, TypeError, KeyError, StateError) as exc:
            # Atomic writes make this a disk fault, not a crash artefact. Keep the
            # evidence and start empty: the retained desired state drives the
            # device back to where the controller wants it.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            log.error(
                "state file unreadable, starting empty path=%s moved_to=%s error=%s", self.path, aside, exc
            )
            return DeviceState()

    def save(self, state: DeviceState) -> None:
        try:
            with refused_for_space(f"writing {self.path.name}"):
                write_atomic(self.path, json.dumps(state.to_json(), indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc}") from None
