"""The names a device may make the controller store rows or labels under.

Model, version and tenant names in telemetry are the device's choice. What is kept
per name (roll-ups, tenant counters, drift sketches, metric labels) carries only
names the controller registered: a model version in the registry; a tenant that is
``default``, declared on the device, or named by a rollout (and the ``.shadow`` slot
of one of those). Any other name becomes :data:`UNREGISTERED`, its figures added to
that row, so a device sending fresh names in every window adds no rows.

:func:`fold_telemetry` gives the ingest's observers a copy of a window with its names
folded and at most :data:`MAX_ENTRIES` entries of each kind (a device runs a handful
of tenants); the raw window is stored as sent, within the device's telemetry quota.
Names found registered are cached (registrations are not taken back); a name not
found is looked up again the next time, with indexed queries.
"""

from __future__ import annotations

import json
import threading

from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import DEFAULT_TENANT, SHADOW_SUFFIX

from controller.store import Store

UNREGISTERED = "unregistered"
# Entries of each kind (model stats, tenant stats, drift sketches) kept from one window.
MAX_ENTRIES = 64
# Names remembered as registered; past this the cache starts again (it only saves queries).
MAX_CACHED = 100_000


class RegisteredNames:
    """Thread-safe look-ups of registered names, for the ingest worker."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._versions: set[tuple[str, str]] = set()
        self._tenants: set[tuple[str, str]] = set()

    def model(self, name: str, version: str) -> tuple[str, str]:
        """(name, version) as stored: each one :data:`UNREGISTERED` unless registered."""
        with self._lock:
            if (name, version) in self._versions:
                return name, version
        if self.store.query_one(
            "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, version)
        ):
            self._remember(self._versions, (name, version))
            return name, version
        if self.store.query_one("SELECT 1 FROM models WHERE name = ?", (name,)):
            return name, UNREGISTERED
        return UNREGISTERED, UNREGISTERED

    def tenant(self, device_id: str, tenant: str) -> str:
        """``tenant`` as stored for ``device_id``: :data:`UNREGISTERED` unless registered."""
        base = (tenant or DEFAULT_TENANT).removesuffix(SHADOW_SUFFIX)
        if base == DEFAULT_TENANT:
            return tenant or DEFAULT_TENANT
        with self._lock:
            if (device_id, base) in self._tenants:
                return tenant
        if self._declared(device_id, base) or self._rolled_out(device_id, base):
            self._remember(self._tenants, (device_id, base))
            return tenant
        return UNREGISTERED

    def _declared(self, device_id: str, tenant: str) -> bool:
        row = self.store.query_one("SELECT tenants FROM device_tenants WHERE device_id = ?", (device_id,))
        if row is None:
            return False
        try:
            return any(str(t.get("id")) == tenant for t in json.loads(row["tenants"]))
        except (ValueError, TypeError, AttributeError):
            return False

    def _rolled_out(self, device_id: str, tenant: str) -> bool:
        return bool(
            self.store.query_one(
                "SELECT 1 FROM rollout_members WHERE device_id = ? AND tenant = ?", (device_id, tenant)
            )
            or self.store.query_one("SELECT 1 FROM rollouts WHERE tenant = ? LIMIT 1", (tenant,))
        )

    def _remember(self, cache: set[tuple[str, str]], key: tuple[str, str]) -> None:
        with self._lock:
            if len(cache) >= MAX_CACHED:
                cache.clear()
            cache.add(key)


def fold_telemetry(names: RegisteredNames, device_id: str, msg: fleet_pb2.Telemetry) -> fleet_pb2.Telemetry:
    """A copy of ``msg`` whose model stats, tenant stats and drift sketches carry registered
    names only (at most :data:`MAX_ENTRIES` of each); a drift sketch of an unregistered
    version is left out (there is no baseline to compare it with), as is a second sketch
    of the same tenant and version."""
    folded = fleet_pb2.Telemetry()
    folded.CopyFrom(msg)
    del folded.models[:], folded.tenants[:], folded.drift[:]
    for m in msg.models[:MAX_ENTRIES]:
        added = folded.models.add()
        added.CopyFrom(m)
        added.model_name, added.model_version = names.model(m.model_name, m.model_version)
        added.tenant = names.tenant(device_id, m.tenant)
    for t in msg.tenants[:MAX_ENTRIES]:
        added_tenant = folded.tenants.add()
        added_tenant.CopyFrom(t)
        added_tenant.tenant = names.tenant(device_id, t.tenant)
    seen: set[tuple[str, str, str]] = set()
    for sk in msg.drift[:MAX_ENTRIES]:
        model = names.model(sk.model_name, sk.model_version)
        tenant = names.tenant(device_id, sk.tenant)
        key = (tenant, *model)
        if UNREGISTERED in model or key in seen:
            continue
        seen.add(key)
        added_sketch = folded.drift.add()
        added_sketch.CopyFrom(sk)
        added_sketch.tenant = tenant
    return folded
