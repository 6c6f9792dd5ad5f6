"""Capture policies, and the monitoring part of each device's desired state.

An operator sets what a model's tenants capture (a random fraction, low
confidence, drifted inputs; bounded per hour and per upload). The devices learn
it, and the drift spec (bin edges) of the version they run, from their desired
state: :func:`decorate` (pure) puts the matching ``DriftSpec`` and
``CapturePolicy`` entries into a ``DesiredState`` for the models it assigns.
:class:`DesiredMonitoring` keeps every device's desired state decorated: a
rollout writes desired states without these entries, a new baseline or policy
changes them; each maintenance tick re-issues (generation + 1) the desired
states that differ from their decorated form, which also carries exactly the
tenants the controller declares on the device (:mod:`controller.tenants`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode

from controller.baselines import Baselines, spec_message
from controller.errors import InvalidPolicy, NotFoundError
from controller.store import Store
from controller.tenants import DeviceTenants, with_tenants

log = logging.getLogger(__name__)

FRACTIONS = ("random_fraction", "low_confidence_below", "drifted_feature_share")
BOUNDS = ("max_samples_per_hour", "max_samples_per_upload", "max_bytes_per_upload")
DEFAULT_BOUNDS = {"max_samples_per_hour": 600, "max_samples_per_upload": 200, "max_bytes_per_upload": 4 << 20}


class Publisher(Protocol):
    def publish_desired(self, device_id: str, payload: bytes) -> None: ...


def parse_capture_policy(model_name: str, tenant: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(doc) - set(FRACTIONS) - set(BOUNDS))
    if unknown:
        raise InvalidPolicy(f"unknown capture policy fields: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key in FRACTIONS:
        value = doc.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise InvalidPolicy(f"{key} must be a number between 0 and 1, not {value!r}")
        out[key] = float(value)
    for key in BOUNDS:
        value = doc.get(key, DEFAULT_BOUNDS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidPolicy(f"{key} must be a whole number >= 0, not {value!r}")
        out[key] = value
    if not any(out[k] > 0 for k in FRACTIONS):
        raise InvalidPolicy("a capture policy needs at least one of " + ", ".join(FRACTIONS) + " above 0")
    return out


def decorate(
    desired: fleet_pb2.DesiredState,
    specs: Mapping[tuple[str, str], fleet_pb2.DriftSpec],
    policies: Mapping[tuple[str, str], fleet_pb2.CapturePolicy],
) -> fleet_pb2.DesiredState:
    """``desired`` with exactly the drift specs and capture policies of the models it assigns.

    ``specs`` is keyed by (model, version) (tenant left empty), ``policies`` by
    (model, tenant). The generation is left alone: the caller decides.
    """
    out = fleet_pb2.DesiredState()
    out.CopyFrom(desired)
    del out.drift_specs[:]
    del out.capture_policies[:]
    for a in sorted(desired.models, key=lambda m: m.tenant):
        spec = specs.get((a.model_name, a.model_version))
        if spec is not None:
            entry = out.drift_specs.add()
            entry.CopyFrom(spec)
            entry.tenant = a.tenant
        policy = policies.get((a.model_name, a.tenant))
        if policy is not None:
            out.capture_policies.add().CopyFrom(policy)
    return out


class DesiredMonitoring:
    def __init__(self, store: Store, baselines: Baselines, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.baselines = baselines
        self.clock = clock
        self.publisher: Publisher | None = None
        self.tenants = DeviceTenants(store, clock)

    # -- capture policies ---------------------------------------------------------

    def put(self, model_name: str, tenant: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        fields = parse_capture_policy(model_name, tenant, doc)
        with self.store.transaction():
            row = self.store.query_one(
                "SELECT version FROM capture_policies WHERE model_name = ? AND tenant = ?",
                (model_name, tenant),
            )
            version = (row["version"] if row else 0) + 1
            self.store.execute(
                "INSERT INTO capture_policies (model_name, tenant, version, doc, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (model_name, tenant) DO UPDATE SET version = excluded.version, doc = excluded.doc,"
                " updated_at = excluded.updated_at",
                (model_name, tenant, version, json.dumps(fields), self.clock()),
            )
        log.info("capture policy set model=%s tenant=%s version=%d", model_name, tenant, version)
        return self.get(model_name, tenant)

    def get(self, model_name: str, tenant: str) -> dict[str, Any]:
        row = self.store.query_one(
            "SELECT * FROM capture_policies WHERE model_name = ? AND tenant = ?", (model_name, tenant)
        )
        if row is None:
            raise NotFoundError(f"model {model_name} has no capture policy for tenant {tenant}")
        return {
            "model_name": model_name,
            "tenant": tenant,
            "version": row["version"],
            "policy_id": f"{model_name}.{tenant}.capture-v{row['version']}",
            **json.loads(row["doc"]),
            "updated_at": row["updated_at"],
        }

    def _policies(self) -> dict[tuple[str, str], fleet_pb2.CapturePolicy]:
        out = {}
        for r in self.store.query("SELECT model_name, tenant FROM capture_policies"):
            p = self.get(r["model_name"], r["tenant"])
            out[(p["model_name"], p["tenant"])] = fleet_pb2.CapturePolicy(
                tenant=p["tenant"],
                model_name=p["model_name"],
                policy_id=p["policy_id"],
                **{k: p[k] for k in (*FRACTIONS, *BOUNDS)},
            )
        return out

    def _specs(self) -> dict[tuple[str, str], fleet_pb2.DriftSpec]:
        out = {}
        for b in self.baselines.all():
            out[(b.model_name, b.model_version)] = spec_message("", b.model_name, b.model_version, b.spec)
        return out

    # -- keeping desired states decorated -------------------------------------------

    def reconcile(self) -> list[str]:
        """Re-issue every desired state whose monitoring entries are out of date; returns the devices."""
        specs, policies, tenants = self._specs(), self._policies(), self.tenants.all()
        changed = []
        rows = self.store.query(
            "SELECT device_id, desired_generation, desired FROM devices WHERE desired IS NOT NULL ORDER BY device_id"
        )
        for r in rows:
            try:
                desired = decode_as(fleet_pb2.DesiredState, bytes(r["desired"]))
            except PayloadError as exc:
                log.error("stored desired state unreadable device=%s error=%s", r["device_id"], exc)
                continue
            wanted = with_tenants(decorate(desired, specs, policies), tenants.get(r["device_id"], []))
            if encode(wanted) == encode(desired):
                continue
            wanted.generation = max(desired.generation, r["desired_generation"]) + 1
            wanted.issued_at_ms = int(self.clock() * 1000)
            payload = encode(wanted)
            # Compare-and-set: a rollout that wrote meanwhile wins; the next tick decorates its state.
            if not self.store.execute(
                "UPDATE devices SET desired_generation = ?, desired = ? WHERE device_id = ? AND desired_generation = ?",
                (wanted.generation, payload, r["device_id"], r["desired_generation"]),
            ):
                continue
            changed.append(r["device_id"])
            log.info(
                "desired monitoring updated device=%s generation=%d drift_specs=%d capture_policies=%d tenants=%d",
                r["device_id"],
                wanted.generation,
                len(wanted.drift_specs),
                len(wanted.capture_policies),
                len(wanted.tenants),
            )
            if self.publisher is not None:
                self.publisher.publish_desired(r["device_id"], payload)
        return changed
