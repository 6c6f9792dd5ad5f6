"""A batch of windows stored at once leaves what the same windows stored one by one leave: the
ingest writes each batch's roll-ups, tenant counters and outbox-loss totals in a few statements
(one a window made the database's round trips the limit), and must not count differently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2

from controller.rollups import DAY_S, Retention, Rollups, bucket_of
from controller.telemetry import TelemetryStore
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

RECEIVED_AT = 1_700_000_000.0


def window(device_id: str, seq: int, dropped: int) -> fleet_pb2.Telemetry:
    end_ms = int(RECEIVED_AT * 1000) - 200_000 + seq * 20_000  # three windows a minute: shared buckets
    msg = fleet_pb2.Telemetry(
        device_id=device_id,
        seq=seq,
        window_start_ms=end_ms - 20_000,
        window_end_ms=end_ms,
        outbox_dropped=dropped,
    )
    for tenant in ("default", "cam"):
        msg.models.add(
            tenant=tenant,
            model_name="m",
            model_version="1",
            inference_count=10 * seq,
            error_count=seq % 2,
            latency_p50_ms=1.0 + seq,
            latency_p95_ms=2.0 + seq,
            latency_p99_ms=float(seq % 4),
        )
        msg.tenants.add(tenant=tenant, inferences=10 * seq, dropped=seq % 3, errors=seq % 2)
    return msg


def windows(device_id: str) -> list[tuple[str, fleet_pb2.Telemetry, float]]:
    """Out of order, a resend within the batch, and an outbox count that starts again."""
    plan = [(1, 0), (2, 2), (4, 5), (3, 4), (3, 4), (5, 1), (6, 3)]
    return [
        (device_id, window(device_id, seq, dropped), RECEIVED_AT + i) for i, (seq, dropped) in enumerate(plan)
    ]


def rows(parts: Parts, table: str, device_id: str, order: str) -> list[dict[str, Any]]:
    found = parts.store.query(f"SELECT * FROM {table} WHERE device_id = ? ORDER BY {order}", (device_id,))
    return [{k: v for k, v in r.items() if k not in ("device_id", "id", "updated_at")} for r in found]


def test_a_batch_counts_what_the_same_windows_one_by_one_count(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    for device_id in ("batched", "single"):
        parts.fleet.register(device_id)
    telemetry: TelemetryStore = parts.telemetry
    rollups = Rollups(parts.store, 60, Retention(7 * DAY_S, 90 * DAY_S), clock=lambda: RECEIVED_AT)
    telemetry.batch_observers.append(rollups.observe_many)

    stored = telemetry.ingest_many(windows("batched"))
    assert stored == [True, True, True, True, False, True, True]
    for device_id, msg, at in windows("single"):
        telemetry.ingest_many([(device_id, msg, at)])

    for table, order in (
        ("telemetry_rollups", "tenant, bucket_start_ms"),
        ("tenant_counters", "tenant"),
        ("outbox_losses", "device_id"),
    ):
        batched, single = rows(parts, table, "batched", order), rows(parts, table, "single", order)
        assert batched == single, table
        assert batched, table
    # Six windows (the resend once) per tenant, several in each one-minute bucket.
    buckets = rows(parts, "telemetry_rollups", "batched", "tenant, bucket_start_ms")
    minutes = {bucket_of(msg.window_end_ms, 60_000) for _, msg, _ in windows("batched")}
    assert sum(b["windows"] for b in buckets) == 12 and len(buckets) == 2 * len(minutes) < 12
    # "cam" is declared nowhere: its figures are kept under the unregistered tenant.
    [cam] = rows(parts, "tenant_counters", "batched", "tenant")[1:]
    assert cam["inferences"] == 10 * (1 + 2 + 4 + 3 + 5 + 6)
    # 0, 2, 5 (3 is older), then 1 (started again: all new) and 3: 5 + 1 + 2.
    [losses] = rows(parts, "outbox_losses", "batched", "device_id")
    assert losses["dropped_at_bound"] == 8 and losses["seq"] == 6


def test_locks_on_many_names_are_taken_in_one_statement(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    with parts.store.transaction():
        parts.store.lock_many(["telemetry/b", "telemetry/a", "telemetry/b"])
        parts.store.lock_many([])
