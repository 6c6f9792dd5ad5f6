"""Prometheus metrics, computed from the store when scraped (prometheus-client).

Nothing is kept in process memory: a restarted controller, or several replicas
behind one scrape target, report the same numbers. Every scrape runs a handful
of indexed queries over the roll-ups, the newest drift windows and the
retraining runs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.baselines import Baselines
from controller.errors import ControllerError
from controller.rollups import Rollups
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
        for v in s.rollups.by_version(RATE_WINDOW_S, now):
            key = [v.model_name, v.model_version]
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
        for name, version in s.baselines.versions_with_sketches(since_ms):
            windows = s.baselines.fleet_scores(name, version, since_ms)
            if windows:
                psi.add_metric([name, version], windows[-1].score.psi)
                kl.add_metric([name, version], windows[-1].score.kl)
            for device, w in s.baselines.latest_by_device(name, version, since_ms).items():
                device_psi.add_metric([name, version, device], w.score.psi)
        yield from (psi, kl, device_psi)

        tenant_labels = ["device", "tenant"]
        dropped = CounterMetricFamily(
            "edgefleet_tenant_dropped", "Samples a tenant's full queue dropped", labels=tenant_labels
        )
        tenant_errors = CounterMetricFamily(
            "edgefleet_tenant_errors", "Failed inferences of a tenant pipeline", labels=tenant_labels
        )
        for r in s.store.query("SELECT * FROM tenant_counters ORDER BY device_id, tenant"):
            dropped.add_metric([r["device_id"], r["tenant"]], r["dropped"])
            tenant_errors.add_metric([r["device_id"], r["tenant"]], r["errors"])
        yield from (dropped, tenant_errors)

        runs = CounterMetricFamily(
            "edgefleet_retraining_runs", "Retraining runs by policy and status", labels=["policy", "status"]
        )
        for r in s.store.query(
            "SELECT policy_name, status, count(*) AS n FROM retraining_runs GROUP BY 1, 2 ORDER BY 1, 2"
        ):
            runs.add_metric([r["policy_name"], r["status"]], r["n"])
        yield runs


def render(sources: Sources) -> bytes:
    """The exposition text for one scrape (a registry per scrape: nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(sources))
    return generate_latest(registry)
