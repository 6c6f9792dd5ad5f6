"""Bounded store-and-forward queue on disk (SQLite, WAL) for telemetry and events.

Append always writes to disk first; the sender reads the oldest rows, publishes
them and deletes a row only once the broker acknowledged it. When the bound is
exceeded the oldest rows are dropped and a persisted counter says how many.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import OutboxError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0), ('seq', 0);
"""


@dataclass(frozen=True)
class Record:
    id: int
    kind: str
    payload: bytes
    created_ms: int


class Outbox:
    def __init__(self, path: Path, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.path = Path(path)
        self.max_records = max_records
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from None

    def append(self, kind: str, payload: bytes, created_ms: int) -> int:
        """Store a record; returns how many old records the bound dropped to make room."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO outbox (kind, payload, created_ms) VALUES (?, ?, ?)", (kind, payload, created_ms)
            )
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = int(count) - self.max_records
            if excess > 0:
                db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)
                )
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
            return max(0, excess)

    def oldest(self, limit: int, after_id: int = 0) -> list[Record]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, kind, payload, created_ms FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Record(int(r[0]), str(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    def delete(self, record_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (record_id,))

    def __len__(self) -> int:
        with self._tx() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def dropped(self) -> int:
        with self._tx() as db:
            (value,) = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(value)

    def next_seq(self) -> int:
        """A per-device sequence number that survives restarts (Telemetry.seq)."""
        with self._tx() as db:
            db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
            (value,) = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        return int(value)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Acknowledgeable(Protocol):
    ok: bool
    reason: str

    @property
    def done(self) -> bool: ...


class OutboxSender:
    """Drains the outbox oldest first over a publish function, a bounded window at a time.

    A row is deleted only when the broker acknowledged it with a success reason
    code. A refusal keeps the row and pauses sending (jittered backoff); the
    bound eventually drops what can never be delivered.
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[str, bytes], Acknowledgeable],
        window: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.publish = publish
        self.window = window
        self.clock = clock
        self.inflight: dict[int, Acknowledgeable] = {}
        self.refusals = 0
        self.paused_until = 0.0

    def pump(self, connected: bool) -> None:
        for record_id, pub in list(self.inflight.items()):
            if not pub.done:
                continue
            del self.inflight[record_id]
            if pub.ok:
                self.outbox.delete(record_id)
                self.refusals = 0
            else:
                self.refusals += 1
                self.paused_until = self.clock() + random.uniform(0, 1.5 ** min(10, self.refusals))
                log.error("outbox record refused id=%d reason=%s", record_id, pub.reason)
        if not connected or self.clock() < self.paused_until:
            return
        free = self.window - len(self.inflight)
        if free <= 0:
            return
        after = max(self.inflight, default=0)
        for record in self.outbox.oldest(free, after_id=after):
            self.inflight[record.id] = self.publish(record.kind, record.payload)

    @property
    def busy(self) -> bool:
        return bool(self.inflight)
