"""Bounded store-and-forward queue on disk (SQLite, WAL) for telemetry, events and captures.

Append always writes to disk first; the sender reads the oldest rows and
publishes them. An event or capture row is deleted once the broker acknowledged
it (PUBACK). A telemetry window stays until the controller says it stored it
(TelemetryAck, keyed by the window's seq): a PUBACK only means the broker has
it, and the broker loses what it queued for the controller when the
controller's session is lost. A window without that acknowledgement is sent
again after ``ack_timeout_s`` and whenever the link comes back; the controller
stores each window once however many copies arrive. When the bound is exceeded
the oldest rows are dropped and a persisted counter says how many.

A full disk is a condition, not a fault: no write here raises. A record that
cannot be stored makes room first, the oldest telemetry going first, and is
counted as unwritable if there is still none; storing resumes by itself when
space returns. Room is only possible with some slack: in WAL mode a delete is
itself a write, and a checkpoint may need the database file to grow, so the
outbox keeps a reserve file it gives back to the disk when it is full and
writes again once there is space.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.backoff import backoff_delay
from agent.compat import sqlite_full
from agent.conditions import DISK_FULL, Conditions

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
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0), ('seq', 0), ('dropped_for_space', 0);
"""
# Telemetry rows carry their window's seq, which the controller's acknowledgement names.
_SEQ_COLUMN = "ALTER TABLE outbox ADD COLUMN seq INTEGER"
_SEQ_INDEX = "CREATE INDEX IF NOT EXISTS outbox_seq ON outbox (seq)"

# Given back to a full disk so that making room (a checkpoint, a delete) can be written.
RESERVE_BYTES = 1024 * 1024
# Checkpoint often, so little of the outbox waits in the WAL for the database file to grow.
WAL_AUTOCHECKPOINT_PAGES = 64
# How often an outbox that could not be opened is tried again.
REOPEN_S = 5.0
# Below this much free space records are stored in pages freed by dropping the oldest,
# so the file does not grow; more than the WAL holds before a checkpoint.
LOW_SPACE_BYTES = 512 * 1024


class _NoRoom(sqlite3.OperationalError):
    """A record would need the database file to grow, on a disk short of space."""


@dataclass(frozen=True)
class Record:
    id: int
    kind: str
    payload: bytes
    created_ms: int
    seq: int | None = None


class Outbox:
    def __init__(
        self,
        path: Path,
        max_records: int,
        conditions: Conditions | None = None,
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.path = Path(path)
        self.reserve = self.path.with_name(self.path.name + ".reserve")
        # 0: no reserve file (thousands of simulated devices on one machine's memory-backed folder).
        self.reserve_bytes = reserve_bytes
        self.max_records = max_records
        # Where a full disk is reported with the device's state (cleared by whoever sees space return).
        self.conditions = conditions
        self._lock = threading.RLock()
        # Records that could not be stored since the agent started (Telemetry.outbox_unwritable).
        self.unwritable = 0
        self._failing_since: float | None = None
        self._dropping = False
        # Rows sent and done with whose delete could not be written yet (disk full).
        self._undeleted: set[int] = set()
        self._seq = 0
        # None while the database cannot be opened (a full disk can refuse even that):
        # records are then counted as unwritable, and opening is tried again now and then.
        self._db: sqlite3.Connection | None = None
        self._open_again_at = 0.0
        self._try_open()

    def _try_open(self) -> bool:
        db: sqlite3.Connection | None = None
        try:
            db = self._open()
        except sqlite3.Error as first:
            error: sqlite3.Error = first
            # Give the reserve back to the disk and try once more.
            if self._release_reserve():
                try:
                    db = self._open()
                except sqlite3.Error as exc:
                    error = exc
        if db is None:
            self._open_again_at = time.monotonic() + REOPEN_S
            self._failing(error)
            if self._short_of_space():
                self._disk_full(f"the telemetry outbox cannot be opened: {error}")
            return False
        (stored_seq,) = db.execute(
            "SELECT MAX((SELECT value FROM counters WHERE name = 'seq'), IFNULL(MAX(seq), 0)) FROM outbox"
        ).fetchone()
        self._seq = max(self._seq, int(stored_seq))
        self._db = db
        self._keep_reserve()
        return True

    def _conn(self) -> sqlite3.Connection:
        if self._db is None and time.monotonic() >= self._open_again_at:
            self._try_open()
        if self._db is None:
            raise sqlite3.OperationalError(f"outbox {self.path} is not open")
        return self._db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
            if "seq" not in columns:
                db.execute(_SEQ_COLUMN)
            db.execute(_SEQ_INDEX)
        except sqlite3.Error:
            db.close()
            raise
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; raises sqlite3.Error (callers decide whether it is fatal)."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does that).
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error as exc:
                        log.debug("outbox rollback failed path=%s error=%s", self.path, exc)
                raise

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """Rows of a query; none while the database cannot be opened."""
        with self._lock:
            if self._db is None:
                return []
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                # Not fatal either: what cannot be read now is sent later.
                self._failing(exc)
                return []

    # -- writing ---------------------------------------------------------------

    def append(self, kind: str, payload: bytes, created_ms: int, seq: int | None = None) -> int:
        """Store a record; returns how many old records the bound dropped to make room.

        Never raises for a full disk or a failed write. Short of space, the oldest
        records (telemetry first) are dropped in the same transaction to free the
        pages the new one needs; a record that still cannot be stored is counted
        in :attr:`unwritable` and lost.
        """
        with self._lock:
            tight = self._short_of_space()
            try:
                dropped = (
                    self._store_in_place(kind, payload, created_ms, seq)
                    if tight
                    else self._insert(kind, payload, created_ms, seq)
                )
            except sqlite3.Error as first:
                self._failing(first)
                # The slack that lets a checkpoint and the next transaction through.
                self._release_reserve()
                self._checkpoint()
                stored = self._insert_after_failure(kind, payload, created_ms, seq)
                if stored is None:
                    self.unwritable += 1
                    return 0
                # Stored, but the spell goes on until a write succeeds at the first try.
                return stored
            if not tight:
                self._recovered()
            return dropped

    def _insert_after_failure(
        self, kind: str, payload: bytes, created_ms: int, seq: int | None
    ) -> int | None:
        """Store a record a write just refused: in the pages the file has, dropping the oldest
        records, or first growing it when the disk says there is space (a quota says otherwise)."""
        error: sqlite3.Error | None = None
        for in_place in (True,) if self._short_of_space() else (False, True):
            try:
                if in_place:
                    return self._store_in_place(kind, payload, created_ms, seq)
                return self._insert(kind, payload, created_ms, seq)
            except sqlite3.Error as exc:
                error = exc
        log.debug("outbox record not stored kind=%s error=%s", kind, error)
        return None

    def _short_of_space(self) -> bool:
        try:
            return shutil.disk_usage(self.path.parent).free < LOW_SPACE_BYTES
        except OSError:
            return True

    def _checkpoint(self) -> None:
        try:
            self._conn().execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error as exc:
            log.debug("outbox checkpoint failed path=%s error=%s", self.path, exc)

    def _insert(self, kind: str, payload: bytes, created_ms: int, seq: int | None, grow: bool = True) -> int:
        with self._tx() as db:
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            db.execute(
                "INSERT INTO outbox (kind, payload, created_ms, seq) VALUES (?, ?, ?, ?)",
                (kind, payload, created_ms, seq),
            )
            if not grow and db.execute("PRAGMA page_count").fetchone()[0] > pages:
                raise _NoRoom(f"a record of {len(payload)} bytes needs the file to grow")
            if seq is not None:
                db.execute("UPDATE counters SET value = MAX(value, ?) WHERE name = 'seq'", (seq,))
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = int(count) - self.max_records
            if excess > 0:
                db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)
                )
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
            return max(0, excess)

    def _store_in_place(self, kind: str, payload: bytes, created_ms: int, seq: int | None) -> int:
        """Store a record without growing the database file: while it needs new pages, drop the
        oldest records (telemetry first, in doubling batches) and try again. Drops nothing for a
        record that even the emptied outbox would not hold."""
        batch = 1
        while True:
            try:
                return self._insert(kind, payload, created_ms, seq, grow=False)
            except sqlite3.Error as exc:
                if not isinstance(exc, _NoRoom) and not sqlite_full(exc):
                    raise
                if not self._drop_oldest(batch, len(payload)):
                    raise
            batch *= 2

    def _drop_oldest(self, count: int, room_for: int) -> bool:
        with self._tx() as db:
            (page,) = db.execute("PRAGMA page_size").fetchone()
            (free,) = db.execute("PRAGMA freelist_count").fetchone()
            (held,) = db.execute("SELECT IFNULL(SUM(length(payload)), 0) FROM outbox").fetchone()
            if (int(free) + 1) * int(page) + int(held) < room_for:
                return False
            victims = db.execute(
                "SELECT id FROM outbox ORDER BY kind != 'telemetry', id LIMIT ?", (count,)
            ).fetchall()
            if not victims:
                return False
            db.executemany("DELETE FROM outbox WHERE id = ?", victims)
            db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped_for_space'", (len(victims),)
            )
        if not self._dropping:
            self._dropping = True
            log.warning(
                "outbox short of space, oldest records dropped to make room path=%s count=%d",
                self.path,
                len(victims),
            )
            self._disk_full("the telemetry outbox drops its oldest records to make room")
        return True

    def _failing(self, exc: sqlite3.Error) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "outbox cannot store: disk full or write failed, the oldest telemetry makes room and what "
                "does not fit is counted path=%s error=%s",
                self.path,
                exc,
            )
            if sqlite_full(exc):
                self._disk_full(f"the telemetry outbox cannot store: {exc}")

    def _disk_full(self, message: str) -> None:
        # Once per spell: the condition's count is the writes others saw refused.
        if self.conditions is not None:
            self.conditions.hit(DISK_FULL, f"{message} ({self.path})")

    def _recovered(self) -> None:
        if self._undeleted:
            self._flush_undeleted()
        if self._failing_since is not None or self._dropping:
            log.warning(
                "outbox has room again path=%s unwritable=%d dropped_for_space=%d",
                self.path,
                self.unwritable,
                self.dropped_for_space(),
            )
            self._failing_since, self._dropping = None, False
        self._keep_reserve()

    def _keep_reserve(self) -> None:
        """Write the reserve file when it is missing and the disk has room for it twice over."""
        try:
            if not self.reserve_bytes:
                return
            if self.reserve.exists() and self.reserve.stat().st_size >= self.reserve_bytes:
                return
            if shutil.disk_usage(self.path.parent).free < 2 * self.reserve_bytes:
                return
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # Written, not sparse: the blocks must really be held.
                os.write(fd, bytes(self.reserve_bytes))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("outbox reserve not written path=%s error=%s", self.reserve, exc)
            self._release_reserve()

    def _release_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("outbox reserve not removed path=%s error=%s", self.reserve, exc)
            return False
        return True

    def delete(self, record_id: int) -> None:
        """Forget a record that was delivered; on a full disk, as soon as a write succeeds."""
        with self._lock:
            self._undeleted.add(record_id)
            self._flush_undeleted()

    def acknowledge(self, seqs: Iterable[int]) -> list[int]:
        """Forget the telemetry windows the controller stored; returns their record ids."""
        wanted = sorted({int(s) for s in seqs})
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self._read(
            f"SELECT id FROM outbox WHERE kind = 'telemetry' AND seq IN ({marks})", tuple(wanted)
        )
        ids = [int(r[0]) for r in rows]
        with self._lock:
            self._undeleted.update(ids)
            self._flush_undeleted()
        return ids

    def _flush_undeleted(self) -> None:
        ids = sorted(self._undeleted)
        try:
            with self._tx() as db:
                db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
        except sqlite3.Error as exc:
            self._failing(exc)
            return
        self._undeleted.difference_update(ids)

    def next_seq(self) -> int:
        """A per-device sequence number that survives restarts (Telemetry.seq).

        Persisted with the window that carries it and, when the disk allows, at
        once; a number whose window was never stored may be given again after a restart.
        """
        with self._lock:
            self._seq += 1
            try:
                with self._tx() as db:
                    db.execute("UPDATE counters SET value = MAX(value, ?) WHERE name = 'seq'", (self._seq,))
            except sqlite3.Error as exc:
                self._failing(exc)
            return int(self._seq)

    # -- reading ---------------------------------------------------------------

    def oldest(self, limit: int, after_id: int = 0) -> list[Record]:
        rows = self._read(
            "SELECT id, kind, payload, created_ms, seq FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit + len(self._undeleted)),
        )
        return [r for r in map(_record, rows) if r.id not in self._undeleted][:limit]

    def records(self, ids: Iterable[int]) -> list[Record]:
        """The records among ``ids`` still stored, oldest first."""
        wanted = sorted(set(ids) - self._undeleted)
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self._read(
            f"SELECT id, kind, payload, created_ms, seq FROM outbox WHERE id IN ({marks}) ORDER BY id",
            tuple(wanted),
        )
        return [_record(r) for r in rows]

    def __len__(self) -> int:
        rows = self._read("SELECT COUNT(*) FROM outbox")
        return int(rows[0][0]) - len(self._undeleted) if rows else 0

    def _counter(self, name: str) -> int:
        rows = self._read("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def dropped(self) -> int:
        return self._counter("dropped")

    def dropped_for_space(self) -> int:
        return self._counter("dropped_for_space")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._open_again_at = float("inf")


def _record(row: Any) -> Record:
    record_id, kind, payload, created_ms, seq = row
    return Record(
        int(record_id),
        str(kind),
        bytes(payload),
        int(created_ms),
        None if seq is None else int(seq),
    )


class Acknowledgeable(Protocol):
    ok: bool
    reason: str

    @property
    def done(self) -> bool: ...


class OutboxSender:
    """Drains the outbox oldest first over a publish function, a bounded window at a time.

    An event or capture row is deleted when the broker acknowledged it with a
    success reason code; a telemetry row when the controller acknowledged its
    seq (:meth:`acknowledge`). A refusal keeps the row and pauses sending
    (jittered backoff); the bound eventually drops what can never be delivered.
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[str, bytes], Acknowledgeable],
        window: int = 16,
        clock: Callable[[], float] = time.monotonic,
        ack_timeout_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.publish = publish
        self.window = window
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        self.inflight: dict[int, tuple[Acknowledgeable, Record]] = {}
        # Telemetry the broker took, waiting for the controller's acknowledgement: id -> when.
        self.awaiting: dict[int, float] = {}
        # Rows to send again (refused, or not acknowledged in time), oldest first.
        self.again: set[int] = set()
        # The newest row sent since the agent started; newer rows have not been sent yet.
        self.cursor = 0
        self.refusals = 0
        self.paused_until = 0.0
        self.resent = 0

    def pump(self, connected: bool) -> None:
        now = self.clock()
        for record_id, (pub, record) in list(self.inflight.items()):
            if not pub.done:
                continue
            del self.inflight[record_id]
            if pub.ok:
                if record.seq is None:
                    self.outbox.delete(record_id)
                else:
                    self.awaiting[record_id] = now
                self.refusals = 0
            else:
                self.again.add(record_id)
                self.refusals += 1
                self.paused_until = now + backoff_delay(self.refusals)
                log.error("outbox record refused id=%d reason=%s", record_id, pub.reason)
        late = [i for i, at in self.awaiting.items() if now - at >= self.ack_timeout_s]
        if late:
            log.info("telemetry not acknowledged in time, sent again count=%d", len(late))
            self._send_again(late)
        if not connected or now < self.paused_until:
            return
        free = self.window - len(self.inflight)
        if free <= 0:
            return
        if self.again:
            retry = sorted(self.again)[:free]
            self.again.difference_update(retry)
            for record in self.outbox.records(retry):
                self.inflight[record.id] = (self.publish(record.kind, record.payload), record)
                self.resent += 1
            free = self.window - len(self.inflight)
        for record in self.outbox.oldest(max(0, free), after_id=self.cursor):
            self.inflight[record.id] = (self.publish(record.kind, record.payload), record)
            self.cursor = max(self.cursor, record.id)

    def acknowledge(self, seqs: Iterable[int]) -> None:
        """The controller stored these telemetry windows: forget them."""
        for record_id in self.outbox.acknowledge(seqs):
            self.awaiting.pop(record_id, None)
            self.again.discard(record_id)

    def link_up(self) -> None:
        """Acknowledgements published while the link was down are lost: ask again for all."""
        self._send_again(list(self.awaiting))

    def _send_again(self, ids: list[int]) -> None:
        for record_id in ids:
            del self.awaiting[record_id]
        self.again.update(ids)

    @property
    def busy(self) -> bool:
        return bool(self.inflight)
