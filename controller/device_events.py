"""Device events as stored: each field cut to a bound, at most ``quota`` events per device.

An event is what a device chose to say, so nothing in it is trusted for size:
the kind, severity and message are cut, attributes beyond a budget are left
out (the event notes how many), and once a device holds more than its quota the
oldest of its events (by arrival) are dropped, in batches of a tenth of the
quota so the deletion is rare. Each stored event is logged in one bounded line.
"""

from __future__ import annotations

import json
import logging
import threading

from edgefleet_proto import fleet_pb2

from controller.log_bounds import bounded_line
from controller.message_counters import MessageCounters
from controller.store import Store

log = logging.getLogger(__name__)

MAX_KIND_CHARS = 64
MAX_SEVERITY_CHARS = 16
MAX_MESSAGE_CHARS = 1024
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
# The attributes' JSON, keys and values together.
MAX_ATTRIBUTES_CHARS = 2048
# Set on an event whose attributes did not all fit.
OMITTED_ATTRIBUTES = "attributes_omitted"
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def bounded_attributes(attributes: dict[str, str]) -> dict[str, str]:
    """The attributes in key order while they fit :data:`MAX_ATTRIBUTES_CHARS`, each cut."""
    out: dict[str, str] = {}
    used = 2
    items = sorted(attributes.items())
    for i, (key, value) in enumerate(items):
        k, v = _cut(key, MAX_ATTRIBUTE_KEY_CHARS), _cut(value, MAX_ATTRIBUTE_VALUE_CHARS)
        size = len(json.dumps({k: v})) + 2
        if used + size > MAX_ATTRIBUTES_CHARS - 40:
            out[OMITTED_ATTRIBUTES] = str(len(items) - i)
            break
        out[k] = v
        used += size
    return out


class DeviceEvents:
    def __init__(self, store: Store, quota: int, counters: MessageCounters | None = None) -> None:
        self.store = store
        self.quota = quota
        self.counters = counters if counters is not None else MessageCounters()
        self._lock = threading.Lock()
        # Events stored per device, counted from the table once and then kept up to date
        # here (an over-count, after retention pruned, only triggers a recount).
        self._stored: dict[str, int] = {}

    def ingest(self, device_id: str, msg: fleet_pb2.Event, received_at: float) -> None:
        kind = _cut(msg.kind, MAX_KIND_CHARS)
        severity = _cut(msg.severity, MAX_SEVERITY_CHARS)
        message = _cut(msg.message, MAX_MESSAGE_CHARS)
        attributes = bounded_attributes(dict(msg.attributes))
        self.store.partitions.ensure("events", (received_at,))
        self.store.execute(
            "INSERT INTO events (device_id, received_at, at_ms, kind, severity, message, attributes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device_id, received_at, msg.at_ms, kind, severity, message, json.dumps(attributes)),
        )
        self._keep_within_quota(device_id)
        log.log(
            LEVELS.get(severity, logging.INFO),
            "%s",
            bounded_line(
                "device event device=%s kind=%s severity=%s message=%r %s",
                device_id,
                kind,
                severity,
                message,
                " ".join(f"{k}={v}" for k, v in attributes.items()),
            ),
        )

    def _keep_within_quota(self, device_id: str) -> None:
        with self._lock:
            stored = self._stored.get(device_id)
        if stored is None:
            stored = self._count(device_id)
        else:
            stored += 1
        if stored > self.quota:
            stored = self._count(device_id)
        if stored > self.quota:
            keep = self.quota - self.quota // 10
            dropped = self.store.execute(
                "DELETE FROM events WHERE id IN"
                " (SELECT id FROM events WHERE device_id = ? ORDER BY id LIMIT ?)",
                (device_id, stored - keep),
            )
            stored -= dropped
            self.counters.quota(device_id, "events", "dropped_oldest", dropped)
        with self._lock:
            self._stored[device_id] = stored

    def _count(self, device_id: str) -> int:
        row = self.store.query_one("SELECT count(*) AS n FROM events WHERE device_id = ?", (device_id,))
        return int(row["n"]) if row else 0
