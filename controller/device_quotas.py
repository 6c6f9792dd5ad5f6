"""What one device may keep stored in the controller: telemetry and captured data.

Telemetry (its windows and the drift sketches they carried) past a device's byte
quota drops the device's oldest windows and their sketches (by arrival: a device
chooses its own timestamps), a tenth of the quota at a time so the deletion is rare. Captured data past its quota is refused chunk by chunk: a
data set may already be labelled or used for training, so nothing stored is
dropped for a newcomer. A device's usage is counted from the database (and the
staging folder) once, then kept up to date as data arrives, and counted again
when it reaches the quota (retention may have pruned meanwhile) or, for
captured data, grows old.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgefleet_proto import fleet_pb2

from controller.message_counters import MessageCounters
from controller.store import Store

log = logging.getLogger(__name__)

# Counted per stored window beside its JSON columns (ids, times, index entries).
TELEMETRY_ROW_OVERHEAD = 256
_TELEMETRY_SIZE = "length(system) + length(models) + length(shadows) + length(tenants) + " + str(
    TELEMETRY_ROW_OVERHEAD
)
# Counted per stored drift sketch beside its bytes.
SKETCH_ROW_OVERHEAD = 128
_SKETCH_SIZE = f"length(sketch) + {SKETCH_ROW_OVERHEAD}"
CAPTURE_RECOUNT_S = 5.0


def _below(quota: int) -> int:
    """Where pruning stops: a tenth under the quota."""
    return quota - quota // 10


class TelemetryQuota:
    """A :class:`~controller.telemetry.TelemetryStore` observer: runs inside the ingest transaction."""

    def __init__(self, store: Store, quota_bytes: int, counters: MessageCounters) -> None:
        self.store = store
        self.quota = quota_bytes
        self.counters = counters
        self._lock = threading.Lock()
        self._estimate: dict[str, int] = {}

    def observe(self, device_id: str, msg: fleet_pb2.Telemetry, received_at: float) -> None:
        with self._lock:
            estimate = self._estimate.get(device_id)
        if estimate is None:
            estimate = self.stored_bytes(device_id)
        else:
            estimate += self._window_bytes(device_id, msg)
        if estimate > self.quota:
            estimate = self.stored_bytes(device_id)
            if estimate > self.quota:
                estimate -= self._drop_oldest(device_id, estimate - _below(self.quota))
        with self._lock:
            self._estimate[device_id] = estimate

    def stored_bytes(self, device_id: str) -> int:
        row = self.store.query_one(
            f"SELECT (SELECT coalesce(sum({_TELEMETRY_SIZE}), 0) FROM telemetry WHERE device_id = ?)"
            f" + (SELECT coalesce(sum({_SKETCH_SIZE}), 0) FROM drift_sketches WHERE device_id = ?) AS n",
            (device_id, device_id),
        )
        return int(row["n"]) if row else 0

    def _window_bytes(self, device_id: str, msg: fleet_pb2.Telemetry) -> int:
        """The window just stored (found by the key that makes a resend the same row), with its sketches."""
        row = self.store.query_one(
            f"SELECT {_TELEMETRY_SIZE} AS n FROM telemetry WHERE device_id = ? AND seq = ? AND window_start_ms = ?",
            (device_id, msg.seq, msg.window_start_ms),
        )
        sketches = sum(sk.ByteSize() + SKETCH_ROW_OVERHEAD for sk in msg.drift)
        return (int(row["n"]) if row else 0) + sketches

    def _drop_oldest(self, device_id: str, excess: int) -> int:
        freed, last, windows = 0, None, 0
        rows = self.store.query(
            f"SELECT id, received_at, {_TELEMETRY_SIZE} AS n FROM telemetry WHERE device_id = ? ORDER BY id",
            (device_id,),
        )
        sketches = {
            r["received_at"]: int(r["n"])
            for r in self.store.query(
                f"SELECT received_at, sum({_SKETCH_SIZE}) AS n FROM drift_sketches WHERE device_id = ?"
                " GROUP BY received_at",
                (device_id,),
            )
        }
        for r in rows:
            if freed >= excess:
                break
            freed += int(r["n"]) + sketches.get(r["received_at"], 0)
            last = r
            windows += 1
        if last is None:
            return 0
        self.store.execute("DELETE FROM telemetry WHERE device_id = ? AND id <= ?", (device_id, last["id"]))
        # The sketches the dropped windows carried (and any older ones) go with them.
        self.store.execute(
            "DELETE FROM drift_sketches WHERE device_id = ? AND received_at <= ?",
            (device_id, last["received_at"]),
        )
        self.counters.quota(device_id, "telemetry", "dropped_oldest", windows)
        log.warning(
            "telemetry quota reached, oldest windows dropped device=%s windows=%d bytes=%d quota=%d",
            device_id,
            windows,
            freed,
            self.quota,
        )
        return freed


class CaptureQuota:
    """Bytes of captured data a device holds: stored data sets plus uploads still arriving."""

    def __init__(
        self,
        store: Store,
        staging: Path,
        quota_bytes: int,
        counters: MessageCounters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.staging = staging
        self.quota = quota_bytes
        self.counters = counters
        self.clock = clock
        self._lock = threading.Lock()
        # device -> (bytes, when counted exactly)
        self._usage: dict[str, tuple[int, float]] = {}

    def admit(self, device_id: str, chunk: fleet_pb2.CaptureChunk) -> bool:
        """Whether the chunk fits the device's quota; counted as held if it does."""
        now = self.clock()
        with self._lock:
            used, counted_at = self._usage.get(device_id, (0, -CAPTURE_RECOUNT_S))
        if now - counted_at >= CAPTURE_RECOUNT_S:
            used, counted_at = self.used_bytes(device_id), now
        size = len(chunk.data)
        fits = used + size <= self.quota
        if fits:
            used += size
        else:
            self.counters.quota(device_id, "capture", "refused")
        with self._lock:
            self._usage[device_id] = (used, counted_at)
        return fits

    def used_bytes(self, device_id: str) -> int:
        row = self.store.query_one(
            "SELECT coalesce(sum(size), 0) AS n FROM datasets WHERE device_id = ?", (device_id,)
        )
        return (int(row["n"]) if row else 0) + _folder_bytes(self.staging / device_id)


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        uploads = list(os.scandir(folder))
    except OSError:
        return 0
    for upload in uploads:
        try:
            with os.scandir(upload.path) as parts:
                total += sum(p.stat().st_size for p in parts if p.is_file())
        except OSError:
            continue
    return total
