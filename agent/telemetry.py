"""System metrics and inference statistics (per model version and per tenant), one Telemetry per window."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from edgefleet_proto import fleet_pb2

from agent.compat import StrEnum

# Latency samples kept per model and window; past it, reservoir sampling keeps a
# uniform sample so the percentiles stay honest and memory stays bounded.
MAX_SAMPLES = 50_000
_PREFERRED_SENSORS = ("cpu_thermal", "soc_thermal", "coretemp", "k10temp", "cpu-thermal", "acpitz")


class Origin(StrEnum):
    """What fed an inference."""

    # A tenant pipeline's source: camera, microphone, CSV replay, ...
    PIPELINE = "pipeline"
    # A local app's gRPC Infer call.
    GRPC = "grpc"
    # A shadow candidate run on the live model's inputs (tenant ``{tenant}.shadow``).
    SHADOW = "shadow"


@dataclass(frozen=True)
class Inference:
    """One run of a model version on this device, successful or not."""

    # As the model pool names it: ``{tenant}.shadow`` for a shadow candidate.
    tenant: str
    model_name: str
    model_version: str
    origin: Origin
    latency_ms: float
    ok: bool


@dataclass
class _Window:
    latencies: _Reservoir
    count: int = 0
    errors: int = 0
    # Per origin: [inferences, errors].
    origins: dict[Origin, list[int]] = field(default_factory=dict)


class InferenceStats:
    """Per model version and tenant: counters of every inference, drained once per window."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str, str], _Window] = {}
        # Since start, never drained: what the updater's probation judges.
        self._totals: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._rng = rng or random.Random()

    def record(self, inference: Inference) -> None:
        ok = inference.ok
        with self._lock:
            key = (inference.tenant, inference.model_name, inference.model_version)
            count, errors = self._totals.get(key, (0, 0))
            self._totals[key] = (count + 1, errors + (not ok))
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(_Reservoir(self._rng))
            w.count += 1
            by_origin = w.origins.setdefault(inference.origin, [0, 0])
            by_origin[0] += 1
            if not ok:
                w.errors += 1
                by_origin[1] += 1
                return
            w.latencies.add(inference.latency_ms)

    def totals(self, tenant: str, model_name: str, model_version: str) -> tuple[int, int]:
        """(inferences, errors) of one model version since the agent started, whatever fed them."""
        with self._lock:
            return self._totals.get((tenant, model_name, model_version), (0, 0))

    def drain(self) -> list[fleet_pb2.ModelStats]:
        with self._lock:
            windows, self._windows = self._windows, {}
        stats = []
        for (tenant, name, version), w in sorted(windows.items()):
            s = fleet_pb2.ModelStats(
                tenant=tenant,
                model_name=name,
                model_version=version,
                inference_count=w.count,
                error_count=w.errors,
            )
            for origin, (count, errors) in w.origins.items():
                # The proto's fields are named after the origins: pipeline_inferences, ...
                setattr(s, f"{origin.value}_inferences", count)
                setattr(s, f"{origin.value}_errors", errors)
            s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms = _percentiles(w.latencies.values)
            stats.append(s)
        return stats


class Inferences:
    """The one place an inference is recorded, whatever fed it: tenant pipelines, gRPC Infer
    and the shadow lane all call :meth:`record`.

    Each inference counts for its model version and tenant (``models`` of the telemetry, and the
    totals the updater's probation judges) and for its tenant's lane (``tenants``).
    """

    def __init__(self, models: InferenceStats, tenants: PipelineStats) -> None:
        self.models = models
        self.tenants = tenants

    def record(self, inference: Inference) -> None:
        self.models.record(inference)
        self.tenants.inference(inference.tenant, inference.latency_ms, inference.ok)

    def tenant_failed(self, tenant: str) -> None:
        """A tenant's input no model version ran (its pipeline serves another model than it
        declares): an error of the tenant, not of the model that happens to be loaded."""
        self.tenants.inference(tenant, 0.0, ok=False)


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    if not samples:
        return 0.0, 0.0, 0.0
    p50, p95, p99 = np.percentile(np.asarray(samples), [50, 95, 99])
    return float(p50), float(p95), float(p99)


class _Reservoir:
    """A bounded uniform sample of a window's latencies."""

    def __init__(self, rng: random.Random) -> None:
        self.seen = 0
        self.values: list[float] = []
        self._rng = rng

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < MAX_SAMPLES:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < MAX_SAMPLES:
                self.values[slot] = value


@dataclass
class _TenantWindow:
    samples: int = 0
    inferences: int = 0
    dropped: int = 0
    errors: int = 0
    source_failures: int = 0
    skipped_no_model: int = 0
    latencies: _Reservoir | None = None


@dataclass
class _ShadowWindow:
    live_version: str
    compared: int = 0
    top1_counted: int = 0
    top1_agreed: float = 0.0
    deviation_sum: float = 0.0
    candidate: _Reservoir | None = None
    live: _Reservoir | None = None


class PipelineStats:
    """Per-tenant pipeline counters and shadow agreement, drained once per window."""

    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._clock = clock
        self._since = clock()
        self._tenants: dict[str, _TenantWindow] = {}
        self._shadows: dict[tuple[str, str, str], _ShadowWindow] = {}

    def _tenant(self, tenant: str) -> _TenantWindow:
        w = self._tenants.get(tenant)
        if w is None:
            w = self._tenants[tenant] = _TenantWindow(latencies=_Reservoir(self._rng))
        return w

    def sample(self, tenant: str) -> None:
        with self._lock:
            self._tenant(tenant).samples += 1

    def dropped(self, tenant: str, count: int) -> None:
        with self._lock:
            self._tenant(tenant).dropped += count

    def skipped_no_model(self, tenant: str) -> None:
        """A prepared input the tenant had no active model for: not an inference, not an error."""
        with self._lock:
            self._tenant(tenant).skipped_no_model += 1

    def source_failed(self, tenant: str) -> None:
        with self._lock:
            self._tenant(tenant).source_failures += 1

    def inference(self, tenant: str, latency_ms: float, ok: bool) -> None:
        with self._lock:
            w = self._tenant(tenant)
            if ok:
                w.inferences += 1
                assert w.latencies is not None
                w.latencies.add(latency_ms)
            else:
                w.errors += 1

    def shadow(
        self,
        tenant: str,
        live_version: str,
        candidate: tuple[str, str],
        top1: float | None,
        deviation: float,
        candidate_ms: float,
        live_ms: float,
        rows: int = 1,
    ) -> None:
        """Record one run of the candidate over ``rows`` samples; ``top1`` and ``deviation``
        are that run's means over its rows, so each row weighs the same in the window."""
        with self._lock:
            key = (tenant, *candidate)
            w = self._shadows.get(key)
            if w is None:
                w = self._shadows[key] = _ShadowWindow(
                    live_version, candidate=_Reservoir(self._rng), live=_Reservoir(self._rng)
                )
            w.live_version = live_version
            w.compared += rows
            if top1 is not None:
                w.top1_counted += rows
                w.top1_agreed += top1 * rows
            w.deviation_sum += deviation * rows
            assert w.candidate is not None and w.live is not None
            w.candidate.add(candidate_ms)
            w.live.add(live_ms)

    def drain(
        self, weights: dict[str, float], busy_s: dict[str, float]
    ) -> tuple[list[fleet_pb2.TenantStats], list[fleet_pb2.ShadowStats]]:
        with self._lock:
            tenants, self._tenants = self._tenants, {}
            shadows, self._shadows = self._shadows, {}
            now = self._clock()
            elapsed, self._since = max(now - self._since, 1e-9), now
        out = []
        for tenant in sorted(set(tenants) | set(weights)):
            w = tenants.get(tenant, _TenantWindow())
            p50, p95, p99 = _percentiles(w.latencies.values if w.latencies else [])
            out.append(
                fleet_pb2.TenantStats(
                    tenant=tenant,
                    samples=w.samples,
                    inferences=w.inferences,
                    dropped=w.dropped,
                    errors=w.errors,
                    rate_hz=w.inferences / elapsed,
                    latency_p50_ms=p50,
                    latency_p95_ms=p95,
                    latency_p99_ms=p99,
                    source_failures=w.source_failures,
                    weight=weights.get(tenant, 0.0),
                    busy_s=busy_s.get(tenant, 0.0),
                    skipped_no_model=w.skipped_no_model,
                )
            )
        shadow_stats = []
        for (tenant, name, version), s in sorted(shadows.items()):
            c50, c95, _ = _percentiles(s.candidate.values if s.candidate else [])
            l50, _, _ = _percentiles(s.live.values if s.live else [])
            shadow_stats.append(
                fleet_pb2.ShadowStats(
                    tenant=tenant,
                    live_model_version=s.live_version,
                    candidate_model_name=name,
                    candidate_model_version=version,
                    compared=s.compared,
                    top1_agreement=s.top1_agreed / s.top1_counted if s.top1_counted else 0.0,
                    mean_abs_deviation=s.deviation_sum / s.compared if s.compared else 0.0,
                    candidate_latency_p50_ms=c50,
                    candidate_latency_p95_ms=c95,
                    live_latency_p50_ms=l50,
                )
            )
        return out, shadow_stats


def temperature_c() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    names = [n for n in _PREFERRED_SENSORS if n in sensors] + sorted(set(sensors) - set(_PREFERRED_SENSORS))
    for name in names:
        for entry in sensors[name]:
            if entry.current is not None and entry.current > -273:
                return float(entry.current)
    return None


class SystemSampler:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        # The first cpu_percent() call only sets the baseline.
        psutil.cpu_percent(interval=None)

    def sample(self) -> fleet_pb2.SystemStats:
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self.data_dir))
        stats = fleet_pb2.SystemStats(
            cpu_percent=psutil.cpu_percent(interval=None),
            mem_total_bytes=mem.total,
            mem_used_bytes=mem.total - mem.available,
            mem_percent=mem.percent,
            disk_total_bytes=disk.total,
            disk_used_bytes=disk.used,
            disk_percent=disk.percent,
            load1=psutil.getloadavg()[0],
        )
        temp = temperature_c()
        if temp is not None:
            stats.temperature_c = temp
        return stats


def build_telemetry(
    device_id: str,
    seq: int,
    window_start_ms: int,
    window_end_ms: int,
    system: fleet_pb2.SystemStats,
    models: list[fleet_pb2.ModelStats],
    outbox_dropped: int,
    tenants: list[fleet_pb2.TenantStats] | None = None,
    shadows: list[fleet_pb2.ShadowStats] | None = None,
    drift: list[fleet_pb2.DriftSketch] | None = None,
) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(
        device_id=device_id,
        seq=seq,
        window_start_ms=window_start_ms,
        window_end_ms=window_end_ms,
        system=system,
        models=models,
        outbox_dropped=outbox_dropped,
        tenants=tenants or [],
        shadows=shadows or [],
        drift=drift or [],
    )
