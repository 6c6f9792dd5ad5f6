"""Telemetry roll-ups per device, model version and time bucket, and the retention policy.

The ingest worker calls :meth:`Rollups.observe` for every newly stored window
(its model and tenant names folded to registered ones, so a device adds no rows
by naming things), inside the batch's transaction, so a roll-up never counts a
window twice (an outbox resend is not "newly stored"). Quantiles cannot be added up; a bucket
keeps the inference-weighted mean of its windows' p50 and p95 and the largest
p99, which is what an operator reads a dashboard for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_proto import fleet_pb2

from controller.partitions import PARTITIONED
from controller.store import Store

log = logging.getLogger(__name__)

DAY_S = 86_400.0
# How far ahead of the controller's clock a window may end and still be rolled up by its own time.
MAX_AHEAD_MS = 60_000


@dataclass(frozen=True)
class VersionStats:
    """One model version across the fleet over the last ``window_s`` seconds."""

    model_name: str
    model_version: str
    inference_count: int
    error_count: int
    window_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float

    @property
    def inference_rate(self) -> float:
        return self.inference_count / self.window_s

    @property
    def error_rate(self) -> float:
        return self.error_count / self.inference_count if self.inference_count else 0.0


@dataclass(frozen=True)
class Retention:
    telemetry_s: float
    rollup_s: float

    def cutoffs(self, now: float) -> tuple[float, int]:
        """(received_at cutoff for raw rows, bucket_start_ms cutoff for roll-ups)."""
        return now - self.telemetry_s, int((now - self.rollup_s) * 1000)


def bucket_of(window_end_ms: int, bucket_ms: int) -> int:
    return (max(window_end_ms, 1) - 1) // bucket_ms * bucket_ms


def _finite(value: float) -> float:
    """A latency a device reported as NaN or infinity (no inference measured) adds nothing."""
    return value if math.isfinite(value) else 0.0


class Rollups:
    def __init__(
        self, store: Store, bucket_s: int, retention: Retention, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.bucket_ms = bucket_s * 1000
        self.retention = retention
        self.clock = clock

    def observe(self, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> None:
        self.observe_many([(device_id, msg, received_at)])

    def observe_many(self, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]) -> None:
        """Add windows (names already folded to registered ones by the ingest), in one statement:
        the windows of one bucket are summed first. A window from the future by the controller's
        clock is rolled up where it arrived: a device picks its own timestamps, and a bucket in
        2100 would outlive every retention."""
        sums: dict[tuple[str, str, str, str, int], list[float]] = {}
        for device_id, msg, received_at in windows:
            end_ms = min(msg.window_end_ms, int(received_at * 1000) + MAX_AHEAD_MS)
            bucket = bucket_of(end_ms, self.bucket_ms)
            for m in msg.models:
                n = m.inference_count
                key = (device_id, m.tenant, m.model_name, m.model_version, bucket)
                row = sums.setdefault(key, [0, 0, 0, 0.0, 0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += n
                row[2] += m.error_count
                row[3] += _finite(m.latency_p50_ms) * n
                row[4] += _finite(m.latency_p95_ms) * n
                row[5] = max(row[5], _finite(m.latency_p99_ms))
                row[6] = max(row[6], received_at)
        if not sums:
            return
        self.store.insert_many(
            "telemetry_rollups",
            (
                "device_id", "tenant", "model_name", "model_version", "bucket_start_ms", "windows",
                "inference_count", "error_count", "latency_p50_sum", "latency_p95_sum", "latency_p99_max",
                "updated_at",
            ),
            [(*key, int(r[0]), int(r[1]), int(r[2]), *r[3:]) for key, r in sums.items()],
            on_conflict=(
                "ON CONFLICT (model_name, model_version, bucket_start_ms, device_id, tenant) DO UPDATE SET"
                " windows = telemetry_rollups.windows + excluded.windows,"
                " inference_count = telemetry_rollups.inference_count + excluded.inference_count,"
                " error_count = telemetry_rollups.error_count + excluded.error_count,"
                " latency_p50_sum = telemetry_rollups.latency_p50_sum + excluded.latency_p50_sum,"
                " latency_p95_sum = telemetry_rollups.latency_p95_sum + excluded.latency_p95_sum,"
                " latency_p99_max = CASE WHEN excluded.latency_p99_max > telemetry_rollups.latency_p99_max"
                " THEN excluded.latency_p99_max ELSE telemetry_rollups.latency_p99_max END,"
                " updated_at = excluded.updated_at"
            ),
        )  # fmt: skip

    def query(
        self,
        device_id: str | None = None,
        model_name: str | None = None,
        since_ms: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, object]]:
        """Buckets newest first, with the weighted latencies worked out."""
        where: list[str] = ["bucket_start_ms >= ?"]
        params: list[Any] = [since_ms]
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if model_name is not None:
            where.append("model_name = ?")
            params.append(model_name)
        rows = self.store.query(
            f"SELECT * FROM telemetry_rollups WHERE {' AND '.join(where)}"
            " ORDER BY bucket_start_ms DESC, device_id, model_name, model_version LIMIT ?",
            [*params, max(1, min(limit, 10_000))],
        )
        out: list[dict[str, object]] = []
        for r in rows:
            n = r["inference_count"]
            out.append(
                {
                    "device_id": r["device_id"],
                    "tenant": r["tenant"],
                    "model_name": r["model_name"],
                    "model_version": r["model_version"],
                    "bucket_start_ms": r["bucket_start_ms"],
                    "bucket_s": self.bucket_ms // 1000,
                    "windows": r["windows"],
                    "inference_count": n,
                    "error_count": r["error_count"],
                    "latency_p50_ms": r["latency_p50_sum"] / n if n else 0.0,
                    "latency_p95_ms": r["latency_p95_sum"] / n if n else 0.0,
                    "latency_p99_ms": r["latency_p99_max"],
                }
            )
        return out

    def by_version(self, window_s: float, now: float | None = None) -> list[VersionStats]:
        """Fleet-wide figures per model version over the newest ``window_s`` seconds of buckets."""
        now = self.clock() if now is None else now
        since = bucket_of(int((now - window_s) * 1000) + 1, self.bucket_ms)
        rows = self.store.query(
            "SELECT model_name, model_version, sum(inference_count) AS n, sum(error_count) AS e,"
            " sum(latency_p50_sum) AS p50, sum(latency_p95_sum) AS p95, max(latency_p99_max) AS p99"
            " FROM telemetry_rollups WHERE bucket_start_ms >= ?"
            " GROUP BY model_name, model_version ORDER BY model_name, model_version",
            (since,),
        )
        return [
            VersionStats(
                model_name=r["model_name"],
                model_version=r["model_version"],
                inference_count=r["n"],
                error_count=r["e"],
                window_s=window_s,
                latency_p50_ms=r["p50"] / r["n"] if r["n"] else 0.0,
                latency_p95_ms=r["p95"] / r["n"] if r["n"] else 0.0,
                latency_p99_ms=r["p99"] or 0.0,
            )
            for r in rows
        ]

    def prune(self, now: float | None = None) -> dict[str, int]:
        """Apply the retention policy; returns the rows removed per table.

        Where raw telemetry and events are partitioned by day (PostgreSQL), the days wholly past
        the cutoff are dropped whole and only the day it falls in is deleted from row by row; the
        days ahead are made here too (controller.partitions)."""
        now = self.clock() if now is None else now
        raw_cutoff, rollup_cutoff = self.retention.cutoffs(now)
        partitions = self.store.partitions
        partitions.ensure_ahead(now)
        removed = {table: partitions.drop_before(table, raw_cutoff) for table in PARTITIONED}
        with self.store.transaction():
            for table in PARTITIONED:
                removed[table] += self.store.execute(
                    f"DELETE FROM {table} WHERE received_at < ?", (raw_cutoff,)
                )
            removed["drift_sketches"] = self.store.execute(
                "DELETE FROM drift_sketches WHERE received_at < ?", (raw_cutoff,)
            )
            removed["telemetry_rollups"] = self.store.execute(
                "DELETE FROM telemetry_rollups WHERE bucket_start_ms < ?", (rollup_cutoff,)
            )
        if any(removed.values()):
            log.info("retention pruned %s", " ".join(f"{k}={v}" for k, v in removed.items()))
        return removed
