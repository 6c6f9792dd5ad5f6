"""Telemetry windows and device events: ingest from MQTT, read back newest first."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet_proto import fleet_pb2

from controller.store import Store

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


@dataclass(frozen=True)
class TelemetryRecord:
    received_at: float
    window_start_ms: int
    window_end_ms: int
    seq: int
    system: dict[str, Any]
    models: list[dict[str, Any]]
    outbox_dropped: int
    shadows: list[dict[str, Any]]


@dataclass(frozen=True)
class EventRecord:
    received_at: float
    at_ms: int
    kind: str
    severity: str
    message: str
    attributes: dict[str, str]


def system_dict(stats: fleet_pb2.SystemStats) -> dict[str, Any]:
    return {
        "cpu_percent": stats.cpu_percent,
        "mem_total_bytes": stats.mem_total_bytes,
        "mem_used_bytes": stats.mem_used_bytes,
        "mem_percent": stats.mem_percent,
        "disk_total_bytes": stats.disk_total_bytes,
        "disk_used_bytes": stats.disk_used_bytes,
        "disk_percent": stats.disk_percent,
        "temperature_c": stats.temperature_c if stats.HasField("temperature_c") else None,
        "load1": stats.load1,
    }


def model_stats_dict(stats: fleet_pb2.ModelStats) -> dict[str, Any]:
    return {
        "tenant": stats.tenant,
        "model_name": stats.model_name,
        "model_version": stats.model_version,
        "inference_count": stats.inference_count,
        "error_count": stats.error_count,
        "latency_p50_ms": stats.latency_p50_ms,
        "latency_p95_ms": stats.latency_p95_ms,
        "latency_p99_ms": stats.latency_p99_ms,
    }


def shadow_stats_dict(stats: fleet_pb2.ShadowStats) -> dict[str, Any]:
    return {
        "tenant": stats.tenant,
        "live_model_version": stats.live_model_version,
        "candidate_model_name": stats.candidate_model_name,
        "candidate_model_version": stats.candidate_model_version,
        "compared": stats.compared,
        "top1_agreement": stats.top1_agreement,
        "mean_abs_deviation": stats.mean_abs_deviation,
        "candidate_latency_p50_ms": stats.candidate_latency_p50_ms,
        "candidate_latency_p95_ms": stats.candidate_latency_p95_ms,
        "live_latency_p50_ms": stats.live_latency_p50_ms,
    }


def _add_shadows_column(store: Store) -> None:
    """Shadow stats (issue 5) live beside the window's model stats, so retention prunes them together.

    Databases made before them get the column here, once; existing rows read as no shadows.
    """
    columns = {r["name"] for r in store.query("PRAGMA table_info(telemetry)")}
    if "shadows" not in columns:
        store.execute("ALTER TABLE telemetry ADD COLUMN shadows TEXT NOT NULL DEFAULT '[]'")


def clamp_limit(limit: int) -> int:
    return max(1, min(limit, MAX_LIMIT))


class TelemetryStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        _add_shadows_column(store)
        # Called, inside the ingest transaction, for each newly stored window
        # (roll-ups and drift sketches: controller.monitoring).
        self.observers: list[Callable[[str, fleet_pb2.Telemetry, float], None]] = []

    def ingest_telemetry(self, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> bool:
        """Store one window; False for a window already stored (an outbox resend)."""
        added = self.store.execute(
            "INSERT OR IGNORE INTO telemetry (device_id, received_at, seq, window_start_ms, window_end_ms,"
            " system, models, outbox_dropped, shadows) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                received_at,
                msg.seq,
                msg.window_start_ms,
                msg.window_end_ms,
                json.dumps(system_dict(msg.system)),
                json.dumps([model_stats_dict(m) for m in msg.models]),
                msg.outbox_dropped,
                json.dumps([shadow_stats_dict(s) for s in msg.shadows]),
            ),
        )
        log.debug("telemetry device=%s seq=%d stored=%s", device_id, msg.seq, bool(added))
        if added:
            for observe in self.observers:
                observe(device_id, msg, received_at)
        return bool(added)

    def ingest_event(self, device_id: str, msg: fleet_pb2.Event, received_at: float) -> None:
        self.store.execute(
            "INSERT INTO events (device_id, received_at, at_ms, kind, severity, message, attributes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                received_at,
                msg.at_ms,
                msg.kind,
                msg.severity,
                msg.message,
                json.dumps(dict(sorted(msg.attributes.items()))),
            ),
        )
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(msg.severity, logging.INFO)
        log.log(
            level,
            "device event device=%s kind=%s severity=%s message=%r %s",
            device_id,
            msg.kind,
            msg.severity,
            msg.message,
            " ".join(f"{k}={v}" for k, v in sorted(msg.attributes.items())),
        )

    def telemetry(self, device_id: str, limit: int = DEFAULT_LIMIT) -> list[TelemetryRecord]:
        rows = self.store.query(
            "SELECT * FROM telemetry WHERE device_id = ? ORDER BY window_end_ms DESC, id DESC LIMIT ?",
            (device_id, clamp_limit(limit)),
        )
        return [
            TelemetryRecord(
                received_at=r["received_at"],
                window_start_ms=r["window_start_ms"],
                window_end_ms=r["window_end_ms"],
                seq=r["seq"],
                system=json.loads(r["system"]),
                models=json.loads(r["models"]),
                outbox_dropped=r["outbox_dropped"],
                shadows=json.loads(r["shadows"]),
            )
            for r in rows
        ]

    def events(self, device_id: str, limit: int = DEFAULT_LIMIT) -> list[EventRecord]:
        rows = self.store.query(
            "SELECT * FROM events WHERE device_id = ? ORDER BY at_ms DESC, id DESC LIMIT ?",
            (device_id, clamp_limit(limit)),
        )
        return [
            EventRecord(
                received_at=r["received_at"],
                at_ms=r["at_ms"],
                kind=r["kind"],
                severity=r["severity"],
                message=r["message"],
                attributes=json.loads(r["attributes"]),
            )
            for r in rows
        ]
