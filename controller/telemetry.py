"""Telemetry windows: ingest from MQTT; windows and device events read back newest first
(events are stored by controller.device_events)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_proto import fleet_pb2
from google.protobuf.message import Message

from controller import outbox_losses
from controller.registered_names import RegisteredNames, fold_telemetry
from controller.store import Store

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


@dataclass(frozen=True)
class TelemetryRecord:
    id: int
    device_id: str
    received_at: float
    window_start_ms: int
    window_end_ms: int
    seq: int
    system: dict[str, Any]
    models: list[dict[str, Any]]
    outbox_dropped: int
    shadows: list[dict[str, Any]]
    tenants: list[dict[str, Any]]


@dataclass(frozen=True)
class EventRecord:
    id: int
    device_id: str
    received_at: float
    at_ms: int
    kind: str
    severity: str
    message: str
    attributes: dict[str, str]


def fields_dict(message: Message) -> dict[str, Any]:
    """Every field of a flat stats message by name, in declaration order; an unset
    optional field (a device without a temperature sensor) is None.

    json_format.MessageToDict is not used: it renders 64-bit integers as strings.
    """
    return {
        f.name: getattr(message, f.name) if not f.has_presence or message.HasField(f.name) else None
        for f in message.DESCRIPTOR.fields
    }


_COLUMNS = (
    "device_id",
    "received_at",
    "seq",
    "window_start_ms",
    "window_end_ms",
    "system",
    "models",
    "outbox_dropped",
    "shadows",
    "tenants",
)


def _row(device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> tuple[Any, ...]:
    """A window as the values of :data:`_COLUMNS`."""
    return (
        device_id,
        received_at,
        msg.seq,
        msg.window_start_ms,
        msg.window_end_ms,
        json.dumps(fields_dict(msg.system)),
        json.dumps([fields_dict(m) for m in msg.models]),
        msg.outbox_dropped,
        json.dumps([fields_dict(s) for s in msg.shadows]),
        json.dumps([fields_dict(t) for t in msg.tenants]),
    )


def window_record(row: dict[str, Any]) -> TelemetryRecord:
    """A stored row of the telemetry table, its JSON columns read."""
    return TelemetryRecord(
        id=row["id"],
        device_id=row["device_id"],
        received_at=row["received_at"],
        window_start_ms=row["window_start_ms"],
        window_end_ms=row["window_end_ms"],
        seq=row["seq"],
        system=json.loads(row["system"]),
        models=json.loads(row["models"]),
        outbox_dropped=row["outbox_dropped"],
        shadows=json.loads(row["shadows"]),
        tenants=json.loads(row["tenants"]),
    )


def event_record(row: dict[str, Any]) -> EventRecord:
    """A stored row of the events table, its attributes read."""
    return EventRecord(
        id=row["id"],
        device_id=row["device_id"],
        received_at=row["received_at"],
        at_ms=row["at_ms"],
        kind=row["kind"],
        severity=row["severity"],
        message=row["message"],
        attributes=json.loads(row["attributes"]),
    )


def clamp_limit(limit: int) -> int:
    return max(1, min(limit, MAX_LIMIT))


class TelemetryStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.names = RegisteredNames(store)
        # Called, inside the ingest transaction, with the newly stored windows, their names
        # folded to registered ones: per window (the telemetry quota, which reads what each
        # window added), or once a batch with all of them (roll-ups, drift sketches: one
        # statement a batch, where one a window made the database's round trips the limit).
        self.observers: list[Callable[[str, fleet_pb2.Telemetry, float], None]] = []
        self.batch_observers: list[Callable[[Sequence[tuple[str, fleet_pb2.Telemetry, float]]], None]] = []

    def ingest_telemetry(self, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> bool:
        """Store one window; False for a window already stored (an outbox resend)."""
        return self.ingest_many([(device_id, msg, received_at)])[0]

    def ingest_many(self, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]) -> list[bool]:
        """Store (device, window, arrival) triples with one multi-row INSERT, in the caller's
        transaction or one of their own; for each, whether it was new (a resend, also within the
        batch, is stored once)."""
        if not windows:
            return []
        self.store.partitions.ensure("telemetry", [received_at for _, _, received_at in windows])
        with self.store.transaction():
            # A resend is the same (device, seq, window start). Partitioned by arrival, the table
            # cannot hold that as a unique key on PostgreSQL: the devices' locks make the check exact.
            self.store.lock_many([f"telemetry/{device_id}" for device_id, _, _ in windows])
            known = self._stored_keys(windows)
            fresh: list[bool] = []
            for device_id, msg, _ in windows:
                key = (device_id, msg.seq, msg.window_start_ms)
                fresh.append(key not in known)
                known.add(key)
            new = [w for w, is_new in zip(windows, fresh, strict=True) if is_new]
            self.store.insert_many("telemetry", _COLUMNS, [_row(*w) for w in new])
            outbox_losses.observe_many(self.store, new)
            # What is kept per name carries registered names only (controller.registered_names).
            names = self.names.known((device_id, msg) for device_id, msg, _ in new)
            folded = [(device_id, fold_telemetry(names, device_id, msg), at) for device_id, msg, at in new]
            self._count_tenants(folded)
            # The batch's sketches first: the quota reads what each window added, sketches included.
            for observe_batch in self.batch_observers:
                observe_batch(folded)
            for device_id, msg, received_at in folded:
                for observe in self.observers:
                    observe(device_id, msg, received_at)
        log.debug("telemetry windows=%d stored=%d", len(windows), len(new))
        return fresh

    def _stored_keys(
        self, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]
    ) -> set[tuple[str, int, int]]:
        """Which of these windows' (device, seq, window start) are stored already."""
        found: set[tuple[str, int, int]] = set()
        for start in range(0, len(windows), 200):
            chunk = windows[start : start + 200]
            rows = self.store.query(
                "SELECT device_id, seq, window_start_ms FROM telemetry WHERE "
                + " OR ".join("(device_id = ? AND seq = ? AND window_start_ms = ?)" for _ in chunk),
                [v for device_id, msg, _ in chunk for v in (device_id, msg.seq, msg.window_start_ms)],
            )
            found.update((r["device_id"], r["seq"], r["window_start_ms"]) for r in rows)
        return found

    def _count_tenants(self, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]) -> None:
        """Running totals per device and tenant, so /metrics reads one small table: summed over
        the batch first, then one statement."""
        sums: dict[tuple[str, str], list[int]] = {}
        for device_id, msg, _ in windows:
            for t in msg.tenants:
                total = sums.setdefault((device_id, t.tenant), [0, 0, 0])
                total[0] += t.inferences
                total[1] += t.dropped
                total[2] += t.errors
        self.store.insert_many(
            "tenant_counters",
            ("device_id", "tenant", "inferences", "dropped", "errors"),
            [(*key, *total) for key, total in sums.items()],
            on_conflict=(
                "ON CONFLICT (device_id, tenant) DO UPDATE SET inferences = tenant_counters.inferences + excluded.inferences,"
                " dropped = tenant_counters.dropped + excluded.dropped, errors = tenant_counters.errors + excluded.errors"
            ),
        )

    def telemetry(self, device_id: str, limit: int = DEFAULT_LIMIT) -> list[TelemetryRecord]:
        rows = self.store.query(
            "SELECT * FROM telemetry WHERE device_id = ? ORDER BY window_end_ms DESC, id DESC LIMIT ?",
            (device_id, clamp_limit(limit)),
        )
        return [window_record(r) for r in rows]

    def events(self, device_id: str, limit: int = DEFAULT_LIMIT) -> list[EventRecord]:
        rows = self.store.query(
            "SELECT * FROM events WHERE device_id = ? ORDER BY at_ms DESC, id DESC LIMIT ?",
            (device_id, clamp_limit(limit)),
        )
        return [event_record(r) for r in rows]
