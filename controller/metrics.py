"""Prometheus metrics, computed from the store when scraped (prometheus-client).

Nothing is kept in process memory: a restarted controller, or several replicas
behind one scrape target, report the same numbers. Every scrape runs a handful
of indexed queries over the roll-ups, the newest drift windows and the
retraining runs.

Model, version and tenant names reach the devices' telemetry from the devices,
so a label carries only names the controller registered (a model version in the
registry; a tenant declared on a device or named by a rollout): any other is
folded into :data:`UNREGISTERED`, and its figures are added to that series.
The ingest folds them already (controller.registered_names); a scrape folds
again what was stored before, or registered for another device.
What the controller refused or cut short is counted from ``message_counters``
(controller.message_counters).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from edgefleet_proto.tenancy import DEFAULT_TENANT, SHADOW_SUFFIX
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller import message_counters, outbox_losses
from controller.baselines import Baselines
from controller.errors import ControllerError
from controller.registered_names import UNREGISTERED
from controller.rollups import Rollups, VersionStats
from controller.store import Store

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Rates are averaged over this many seconds of roll-up buckets.
RATE_WINDOW_S = 300.0


@dataclass
class Sources:
    store: Store
    rollups: Rollups
    baselines: Baselines
    rollouts: Callable[[], list[Any]]
    clock: Callable[[], float] = time.time


class Registered:
    """The names a label may carry, read once per scrape."""

    def __init__(self, store: Store) -> None:
        self.versions = {
            (r["name"], r["version"]) for r in store.query("SELECT name, version FROM model_versions")
        }
        self.models = {name for name, _ in self.versions}
        tenants = {DEFAULT_TENANT}
        for r in store.query("SELECT tenants FROM device_tenants"):
            try:
                tenants.update(str(t["id"]) for t in json.loads(r["tenants"]))
            except (ValueError, TypeError, KeyError):
                continue
        tenants.update(r["tenant"] for r in store.query("SELECT DISTINCT tenant FROM rollout_members"))
        tenants.update(r["tenant"] for r in store.query("SELECT DISTINCT tenant FROM rollouts"))
        self.tenants = tenants

    def model(self, name: str, version: str) -> tuple[str, str]:
        return (
            name if name in self.models else UNREGISTERED,
            version if (name, version) in self.versions else UNREGISTERED,
        )

    def tenant(self, tenant: str) -> str:
        return tenant if tenant.removesuffix(SHADOW_SUFFIX) in self.tenants else UNREGISTERED


def fold_versions(stats: list[VersionStats], registered: Registered) -> dict[tuple[str, str], VersionStats]:
    """Per label pair, the versions' figures combined (latency weighted by inferences, worst p99)."""
    out: dict[tuple[str, str], VersionStats] = {}
    for v in stats:
        key = registered.model(v.model_name, v.model_version)
        seen = out.get(key)
        if seen is None:
            out[key] = replace(v, model_name=key[0], model_version=key[1])
            continue
        n = seen.inference_count + v.inference_count
        weights = (seen.inference_count / n, v.inference_count / n) if n else (0.0, 0.0)
        out[key] = replace(
            seen,
            inference_count=n,
            error_count=seen.error_count + v.error_count,
            latency_p50_ms=weights[0] * seen.latency_p50_ms + weights[1] * v.latency_p50_ms,
            latency_p95_ms=weights[0] * seen.latency_p95_ms + weights[1] * v.latency_p95_ms,
            latency_p99_ms=max(seen.latency_p99_ms, v.latency_p99_ms),
        )
    return out


def _rollout_state(rollout: Any) -> str:
    state = getattr(rollout, "state", None)
    value = getattr(state, "value", state)
    return str(value if value is not None else getattr(rollout, "status", "unknown"))


class FleetCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.sources
        now = s.clock()
        registered = Registered(s.store)
        row = s.store.query_one("SELECT count(*) AS n, coalesce(sum(online), 0) AS online FROM devices")
        total, online = (row["n"], row["online"]) if row else (0, 0)
        yield GaugeMetricFamily("edgefleet_devices", "Registered devices", value=total)
        yield GaugeMetricFamily("edgefleet_devices_online", "Devices whose agent is connected", value=online)

        labels = ["model", "version"]
        rate = GaugeMetricFamily(
            "edgefleet_model_inference_rate",
            f"Inferences per second over {RATE_WINDOW_S:.0f} s",
            labels=labels,
        )
        errors = GaugeMetricFamily(
            "edgefleet_model_error_rate", f"Failed / all inferences over {RATE_WINDOW_S:.0f} s", labels=labels
        )
        latency = GaugeMetricFamily(
            "edgefleet_model_latency_ms",
            "Inference latency quantiles (fleet-wide, weighted by inferences; 0.99 is the worst device window)",
            labels=[*labels, "quantile"],
        )
        for (name, version), v in fold_versions(s.rollups.by_version(RATE_WINDOW_S, now), registered).items():
            key = [name, version]
            rate.add_metric(key, v.inference_rate)
            errors.add_metric(key, v.error_rate)
            for q, value in (
                ("0.5", v.latency_p50_ms),
                ("0.95", v.latency_p95_ms),
                ("0.99", v.latency_p99_ms),
            ):
                latency.add_metric([*key, q], value)
        yield from (rate, errors, latency)

        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
        try:
            counts = Counter(_rollout_state(r) for r in s.rollouts())
        except ControllerError as exc:
            log.warning("metrics: rollouts unavailable error=%s", exc)
            counts = Counter()
        for state, n in sorted(counts.items()):
            rollouts.add_metric([state], n)
        yield rollouts

        psi = GaugeMetricFamily(
            "edgefleet_drift_psi", "PSI of the newest fleet-wide window against the baseline", labels=labels
        )
        kl = GaugeMetricFamily(
            "edgefleet_drift_kl", "KL divergence of the newest fleet-wide window", labels=labels
        )
        device_psi = GaugeMetricFamily(
            "edgefleet_device_drift_psi", "PSI of each device's newest window", labels=[*labels, "device"]
        )
        # The newest complete fleet-wide window and the one being filled: a scrape
        # stays cheap however many windows the retention keeps.
        since_ms = int(now * 1000) - 3 * s.baselines.bucket_ms
        # Folded names keep the worst score among the versions folded together.
        fleet: dict[tuple[str, str], tuple[float, float]] = {}
        per_device: dict[tuple[str, str, str], float] = {}
        for name, version in s.baselines.versions_with_sketches(since_ms):
            label, label_version = registered.model(name, version)
            windows = s.baselines.fleet_scores(name, version, since_ms)
            if windows:
                old_psi, old_kl = fleet.get((label, label_version), (float("-inf"), float("-inf")))
                fleet[(label, label_version)] = (
                    max(old_psi, windows[-1].score.psi),
                    max(old_kl, windows[-1].score.kl),
                )
            for device, w in s.baselines.latest_by_device(name, version, since_ms).items():
                one = (label, label_version, device)
                per_device[one] = max(per_device.get(one, float("-inf")), w.score.psi)
        for pair, (psi_value, kl_value) in fleet.items():
            psi.add_metric(list(pair), psi_value)
            kl.add_metric(list(pair), kl_value)
        for device_key, value in per_device.items():
            device_psi.add_metric(list(device_key), value)
        yield from (psi, kl, device_psi)

        tenant_labels = ["device", "tenant"]
        dropped = CounterMetricFamily(
            "edgefleet_tenant_dropped", "Samples a tenant's full queue dropped", labels=tenant_labels
        )
        tenant_errors = CounterMetricFamily(
            "edgefleet_tenant_errors", "Failed inferences of a tenant pipeline", labels=tenant_labels
        )
        tenant_totals: dict[tuple[str, str], tuple[int, int]] = {}
        for r in s.store.query("SELECT * FROM tenant_counters ORDER BY device_id, tenant"):
            device_tenant = (r["device_id"], registered.tenant(r["tenant"]))
            d, e = tenant_totals.get(device_tenant, (0, 0))
            tenant_totals[device_tenant] = (d + r["dropped"], e + r["errors"])
        for (device, tenant), (d, e) in tenant_totals.items():
            dropped.add_metric([device, tenant], d)
            tenant_errors.add_metric([device, tenant], e)
        yield from (dropped, tenant_errors)
        yield _outbox_losses(s.store)
        yield from _limit_counters(s.store)

        runs = CounterMetricFamily(
            "edgefleet_retraining_runs", "Retraining runs by policy and status", labels=["policy", "status"]
        )
        for r in s.store.query(
            "SELECT policy_name, status, count(*) AS n FROM retraining_runs GROUP BY 1, 2 ORDER BY 1, 2"
        ):
            runs.add_metric([r["policy_name"], r["status"]], r["n"])
        yield runs


def _outbox_losses(store: Store) -> CounterMetricFamily:
    lost = CounterMetricFamily(
        "edgefleet_device_outbox_lost",
        "Records a device's agent could not deliver: dropped at its outbox bound (outbox_bound), "
        "dropped oldest first on a full disk (disk_full), never stored as a write failed (unwritable)",
        labels=["device", "reason"],
    )
    for device_id, losses in outbox_losses.read_all(store).items():
        for reason, value in losses.by_reason().items():
            lost.add_metric([device_id, reason], value)
    return lost


def _limit_counters(store: Store) -> Iterator[CounterMetricFamily]:
    rejected = CounterMetricFamily(
        "edgefleet_rejected_messages",
        "Device messages refused, by topic kind and reason",
        labels=["kind", "reason"],
    )
    limited = CounterMetricFamily(
        "edgefleet_device_rate_limited",
        "Messages (chunk_requests, events) or artifact replies (chunk_bytes) a device's rate limit held back",
        labels=["device", "limit"],
    )
    quota = CounterMetricFamily(
        "edgefleet_device_quota",
        "Items of a device's stored data dropped (oldest first) or refused at its quota",
        labels=["device", "store", "action"],
    )
    served = CounterMetricFamily(
        "edgefleet_artifact_bytes_served",
        "Artifact bytes (manifests and chunks) sent to a device",
        labels=["device"],
    )
    broadcast = CounterMetricFamily(
        "edgefleet_artifact_bytes_broadcast",
        "Artifact bytes (sealed chunks and announcements) published once on wave broadcast topics",
    )
    broadcast_total = 0
    for c in message_counters.read(store):
        if c.counter == message_counters.BYTES_BROADCAST:
            broadcast_total += c.value
        elif c.counter == message_counters.REJECTED:
            rejected.add_metric([c.kind, c.reason], c.value)
        elif c.counter == message_counters.RATE_LIMITED:
            limited.add_metric([c.device_id, c.kind], c.value)
        elif c.counter == message_counters.QUOTA:
            quota.add_metric([c.device_id, c.kind, c.reason], c.value)
        elif c.counter == message_counters.BYTES_SERVED:
            served.add_metric([c.device_id], c.value)
    broadcast.add_metric([], broadcast_total)
    yield from (rejected, limited, quota, served, broadcast)


def render(sources: Sources) -> bytes:
    """The exposition text for one scrape (a registry per scrape: nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(sources))
    return generate_latest(registry)
