"""What each device's agent could not deliver: its telemetry outbox's loss counts, totalled per device.

Every telemetry window carries three counts (Telemetry fields 7, 81, 80): records the
outbox bound dropped and windows deleted, oldest first, to make room on a full disk
(both since the agent's data folder was created), and records that could not be stored
at all because a write failed (since the agent started: a full disk cannot keep that
count). Each is a running count that starts again at zero, so the controller adds up
what each window adds to the one before it and keeps the totals: a count below the one
before means the count started again (a restart, a new data folder), and all of it is new.

Windows arrive late and out of order (the outbox sends again what was not acknowledged),
so only a window numbered after the newest one seen moves the totals. A window numbered
below it but ending more than :data:`NEW_FOLDER_AFTER_MS` after it comes from a data
folder made anew, whose numbering started again at 1. A restart between two windows,
after which the count grew past the old run's, is counted short: the totals are a lower
bound. One row per registered device (the ingest sees no other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_proto import fleet_pb2

from controller.store import Store

# A window numbered below the newest seen, yet ending this much later, starts a new data folder.
NEW_FOLDER_AFTER_MS = 3_600_000

# Prometheus reasons, and the Telemetry field each total is made of.
OUTBOX_BOUND = "outbox_bound"
DISK_FULL = "disk_full"
UNWRITABLE = "unwritable"


@dataclass(frozen=True)
class OutboxLosses:
    """A device's totals, and the newest window they were read from."""

    device_id: str
    dropped_at_bound: int
    dropped_for_space: int
    unwritable: int
    seq: int
    window_end_ms: int
    updated_at: float

    def by_reason(self) -> dict[str, int]:
        return {
            OUTBOX_BOUND: self.dropped_at_bound,
            DISK_FULL: self.dropped_for_space,
            UNWRITABLE: self.unwritable,
        }


def _counts(msg: fleet_pb2.Telemetry) -> tuple[int, int, int]:
    return int(msg.outbox_dropped), int(msg.outbox_dropped_for_space), int(msg.outbox_unwritable)


def _added(last: int, now: int) -> int:
    """What a running count added since ``last``; all of it when it started again."""
    return now - last if now >= last else now


def observe(store: Store, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> None:
    """Count one newly stored window (inside the ingest transaction)."""
    observe_many(store, [(device_id, msg, received_at)])


def observe_many(store: Store, windows: Sequence[tuple[str, fleet_pb2.Telemetry, float]]) -> None:
    """Count newly stored windows, in their order (inside the ingest transaction): the devices'
    rows are read in one query, and written only where the totals move."""
    devices = sorted({device_id for device_id, _, _ in windows})
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(devices), 500):
        chunk = devices[start : start + 500]
        found = store.query(
            "SELECT * FROM outbox_losses WHERE device_id IN (" + ", ".join("?" for _ in chunk) + ")", chunk
        )
        rows.update((r["device_id"], r) for r in found)
    for device_id, msg, received_at in windows:
        row = _count(store, rows.get(device_id), device_id, msg, received_at)
        if row is not None:
            rows[device_id] = row


def _latest(msg: fleet_pb2.Telemetry, counts: tuple[int, int, int]) -> dict[str, Any]:
    """The columns of a device's row that the next window is compared with, after ``msg``."""
    return {
        "seq": msg.seq,
        "window_end_ms": msg.window_end_ms,
        "last_bound": counts[0],
        "last_space": counts[1],
        "last_unwritable": counts[2],
    }


def _count(
    store: Store, row: dict[str, Any] | None, device_id: str, msg: fleet_pb2.Telemetry, received_at: float
) -> dict[str, Any] | None:
    """Add one window to the device's row (None: it has none yet); the row as it now stands."""
    counts = _counts(msg)
    if row is None:
        if not any(counts):
            return None
        store.execute(
            "INSERT INTO outbox_losses (device_id, seq, window_end_ms, last_bound, last_space,"
            " last_unwritable, dropped_at_bound, dropped_for_space, unwritable, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (device_id, msg.seq, msg.window_end_ms, *counts, *counts, received_at),
        )
        return _latest(msg, counts)
    newer = msg.seq > row["seq"]
    new_folder = msg.seq < row["seq"] and msg.window_end_ms > row["window_end_ms"] + NEW_FOLDER_AFTER_MS
    if not (newer or new_folder):
        return row
    last = (row["last_bound"], row["last_space"], row["last_unwritable"])
    if new_folder:
        last = (0, 0, 0)
    bound, space, unwritable = (_added(before, now) for before, now in zip(last, counts, strict=True))
    store.execute(
        "UPDATE outbox_losses SET seq = ?, window_end_ms = ?, last_bound = ?, last_space = ?,"
        " last_unwritable = ?, dropped_at_bound = dropped_at_bound + ?,"
        " dropped_for_space = dropped_for_space + ?, unwritable = unwritable + ?, updated_at = ?"
        " WHERE device_id = ?",
        (msg.seq, msg.window_end_ms, *counts, bound, space, unwritable, received_at, device_id),
    )
    return _latest(msg, counts)


def _from_row(r: dict[str, Any]) -> OutboxLosses:
    return OutboxLosses(
        device_id=r["device_id"],
        dropped_at_bound=r["dropped_at_bound"],
        dropped_for_space=r["dropped_for_space"],
        unwritable=r["unwritable"],
        seq=r["seq"],
        window_end_ms=r["window_end_ms"],
        updated_at=r["updated_at"],
    )


def read(store: Store, device_id: str) -> OutboxLosses | None:
    row = store.query_one("SELECT * FROM outbox_losses WHERE device_id = ?", (device_id,))
    return _from_row(row) if row is not None else None


def read_all(store: Store) -> dict[str, OutboxLosses]:
    return {
        r["device_id"]: _from_row(r) for r in store.query("SELECT * FROM outbox_losses ORDER BY device_id")
    }
