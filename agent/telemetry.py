"""System metrics and per-model inference statistics, one Telemetry per window."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from edgefleet_proto import fleet_pb2

# Latency samples kept per model and window; past it, reservoir sampling keeps a
# uniform sample so the percentiles stay honest and memory stays bounded.
MAX_SAMPLES = 50_000
_PREFERRED_SENSORS = ("cpu_thermal", "soc_thermal", "coretemp", "k10temp", "cpu-thermal", "acpitz")


@dataclass
class _Window:
    count: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class InferenceStats:
    """Thread-safe counters filled by the gRPC handlers, drained once per window."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._rng = rng or random.Random()

    def record(self, tenant: str, model_name: str, model_version: str, latency_ms: float, ok: bool) -> None:
        with self._lock:
            w = self._windows.setdefault((tenant, model_name, model_version), _Window())
            w.count += 1
            if not ok:
                w.errors += 1
                return
            if len(w.latencies_ms) < MAX_SAMPLES:
                w.latencies_ms.append(latency_ms)
            else:
                slot = self._rng.randrange(w.count)
                if slot < MAX_SAMPLES:
                    w.latencies_ms[slot] = latency_ms

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
            if w.latencies_ms:
                p50, p95, p99 = np.percentile(np.asarray(w.latencies_ms), [50, 95, 99])
                s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms = float(p50), float(p95), float(p99)
            stats.append(s)
        return stats


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
) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(
        device_id=device_id,
        seq=seq,
        window_start_ms=window_start_ms,
        window_end_ms=window_end_ms,
        system=system,
        models=models,
        outbox_dropped=outbox_dropped,
    )
