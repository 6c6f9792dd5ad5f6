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
The names of a whole ingest batch are looked up at once (:meth:`RegisteredNames.known`):
a few queries per batch, whatever its size. Names found registered are cached
(registrations are not taken back); a name not found is looked up again in the next
batch, so a registration counts from the batch after it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import DEFAULT_TENANT, SHADOW_SUFFIX

from controller.store import Store

UNREGISTERED = "unregistered"
# Entries of each kind (model stats, tenant stats, drift sketches) kept from one window.
MAX_ENTRIES = 64
# Names remembered as registered; past this the cache starts again (it only saves queries).
MAX_CACHED = 100_000
# Values in one IN (...) list: SQLite's and PostgreSQL's parameter limits are far above.
IN_LIST = 200


@dataclass(frozen=True)
class KnownNames:
    """The registered names among one batch's, answered without queries."""

    models: frozenset[str]
    versions: frozenset[tuple[str, str]]
    # (device, tenant without its shadow suffix)
    tenants: frozenset[tuple[str, str]]

    def model(self, name: str, version: str) -> tuple[str, str]:
        """(name, version) as stored: each one :data:`UNREGISTERED` unless registered."""
        if (name, version) in self.versions:
            return name, version
        if name in self.models:
            return name, UNREGISTERED
        return UNREGISTERED, UNREGISTERED

    def tenant(self, device_id: str, tenant: str) -> str:
        """``tenant`` as stored for ``device_id``: :data:`UNREGISTERED` unless registered."""
        tenant = tenant or DEFAULT_TENANT
        base = tenant.removesuffix(SHADOW_SUFFIX)
        if base == DEFAULT_TENANT or (device_id, base) in self.tenants:
            return tenant
        return UNREGISTERED


class RegisteredNames:
    """Thread-safe look-ups of registered names, for the ingest worker. A batch's names are
    looked up together: one query per name and window entry was most of ingest's CPU."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._versions: set[tuple[str, str]] = set()
        self._tenants: set[tuple[str, str]] = set()

    def known(self, windows: Iterable[tuple[str, fleet_pb2.Telemetry]]) -> KnownNames:
        """What is registered among the names these (device, window) pairs carry, in the
        entries :func:`fold_telemetry` keeps."""
        versions: set[tuple[str, str]] = set()
        tenants: set[tuple[str, str]] = set()
        for device_id, msg in windows:
            models = msg.models[:MAX_ENTRIES]
            sketches = msg.drift[:MAX_ENTRIES]
            versions.update((m.model_name, m.model_version) for m in models)
            versions.update((s.model_name, s.model_version) for s in sketches)
            named = [m.tenant for m in models] + [t.tenant for t in msg.tenants[:MAX_ENTRIES]]
            for tenant in named + [s.tenant for s in sketches]:
                base = (tenant or DEFAULT_TENANT).removesuffix(SHADOW_SUFFIX)
                if base != DEFAULT_TENANT:
                    tenants.add((device_id, base))
        with self._lock:
            cached_versions = versions & self._versions
            cached_tenants = tenants & self._tenants
        found_versions = self._registered_versions(versions - cached_versions)
        found_tenants = self._registered_tenants(tenants - cached_tenants)
        self._remember(self._versions, found_versions)
        self._remember(self._tenants, found_tenants)
        registered = cached_versions | found_versions
        # A model whose version is not registered still has its name kept when the model is.
        names = {name for name, _ in versions - registered}
        return KnownNames(
            models=frozenset({name for name, _ in registered} | self._registered_models(names)),
            versions=frozenset(registered),
            tenants=frozenset(cached_tenants | found_tenants),
        )

    def _registered_versions(self, versions: set[tuple[str, str]]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for names in _chunks(sorted({name for name, _ in versions})):
            rows = self._rows("SELECT name, version FROM model_versions WHERE name IN", names)
            found.update((str(r["name"]), str(r["version"])) for r in rows)
        return found & versions

    def _registered_models(self, names: set[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(names)):
            found.update(str(r["name"]) for r in self._rows("SELECT name FROM models WHERE name IN", chunk))
        return found

    def _registered_tenants(self, tenants: set[tuple[str, str]]) -> set[tuple[str, str]]:
        if not tenants:
            return set()
        names = sorted({tenant for _, tenant in tenants})
        devices = sorted({device_id for device_id, _ in tenants})
        # Named by any rollout: registered on every device.
        by_rollouts: set[str] = set()
        for chunk in _chunks(names):
            by_rollouts.update(
                str(r["tenant"])
                for r in self._rows("SELECT DISTINCT tenant FROM rollouts WHERE tenant IN", chunk)
            )
        found = {(d, t) for d, t in tenants if t in by_rollouts}
        for chunk in _chunks(devices):
            for row in self._rows("SELECT device_id, tenants FROM device_tenants WHERE device_id IN", chunk):
                found.update((str(row["device_id"]), t) for t in _declared(row["tenants"]))
            for row in self.store.query(
                f"SELECT device_id, tenant FROM rollout_members WHERE device_id IN ({_marks(chunk)})"
                f" AND tenant IN ({_marks(names)})",
                [*chunk, *names],
            ):
                found.add((str(row["device_id"]), str(row["tenant"])))
        return found & tenants

    def _rows(self, sql: str, values: Sequence[str]) -> list[dict[str, Any]]:
        return self.store.query(f"{sql} ({_marks(values)})", list(values))

    def _remember(self, cache: set[tuple[str, str]], keys: set[tuple[str, str]]) -> None:
        if not keys:
            return
        with self._lock:
            if len(cache) + len(keys) > MAX_CACHED:
                cache.clear()
            cache.update(keys)


def _declared(tenants_json: Any) -> set[str]:
    """The tenant ids a device declared (its reported tenant list, as stored)."""
    try:
        return {str(t.get("id")) for t in json.loads(tenants_json)}
    except (ValueError, TypeError, AttributeError):
        return set()


def _marks(values: Sequence[str]) -> str:
    return ", ".join("?" for _ in values)


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), IN_LIST):
        yield values[start : start + IN_LIST]


def fold_telemetry(names: KnownNames, device_id: str, msg: fleet_pb2.Telemetry) -> fleet_pb2.Telemetry:
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
