"""Counts of what the controller refused or cut short, for /metrics.

Counted in memory where it happens (often the MQTT network thread, where no
disk I/O belongs) and added to the ``message_counters`` table by :meth:`flush`,
about once a second, so every replica and a restarted controller report the
same totals. A per-device count about a device that is not registered is not
stored (the message is counted under ``rejected`` as well): the device label
never carries a name only the sender chose.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from controller.store import Store

REJECTED = "rejected"
RATE_LIMITED = "rate_limited"
QUOTA = "quota"
BYTES_SERVED = "bytes_served"
BYTES_BROADCAST = "bytes_broadcast"

_UPSERT = (
    "INSERT INTO message_counters (counter, device_id, kind, reason, value)"
    " SELECT ?, ?, ?, ?, ? WHERE ? = '' OR EXISTS (SELECT 1 FROM devices WHERE device_id = ?)"
    " ON CONFLICT (counter, device_id, kind, reason) DO UPDATE SET value = message_counters.value + excluded.value"
)


@dataclass(frozen=True)
class Count:
    counter: str
    device_id: str
    kind: str
    reason: str
    value: int


class MessageCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str, str, str]] = Counter()

    def rejected(self, kind: str, reason: str, n: int = 1) -> None:
        """A message refused, by topic kind (e.g. ``events``) and reason (e.g. ``undecodable``)."""
        self._add(REJECTED, "", kind, reason, n)

    def rate_limited(self, device_id: str, limit: str, n: int = 1) -> None:
        """``n`` messages or chunks of a device held back by ``limit``."""
        self._add(RATE_LIMITED, device_id, limit, "", n)

    def quota(self, device_id: str, store: str, action: str, n: int = 1) -> None:
        """``n`` items of a device's ``store`` dropped (``dropped_oldest``) or ``refused``."""
        self._add(QUOTA, device_id, store, action, n)

    def bytes_served(self, device_id: str, n: int) -> None:
        self._add(BYTES_SERVED, device_id, "", "", n)

    def broadcast_bytes(self, n: int) -> None:
        """``n`` bytes published once on a wave's broadcast topic, whatever the wave's size."""
        self._add(BYTES_BROADCAST, "", "", "", n)

    def _add(self, counter: str, device_id: str, kind: str, reason: str, n: int) -> None:
        if n:
            with self._lock:
                self._pending[(counter, device_id, kind, reason)] += n

    def flush(self, store: Store) -> int:
        """Add the counts taken since the last flush to the table; returns how many rows."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return 0
        try:
            with store.transaction() as tx:
                for (counter, device_id, kind, reason), n in pending.items():
                    tx.execute(_UPSERT, (counter, device_id, kind, reason, n, device_id, device_id))
        except Exception:
            # Kept for the next flush rather than lost.
            with self._lock:
                self._pending.update(pending)
            raise
        return len(pending)


def read(store: Store) -> list[Count]:
    rows = store.query(
        "SELECT counter, device_id, kind, reason, value FROM message_counters"
        " ORDER BY counter, device_id, kind, reason"
    )
    return [Count(**r) for r in rows]
