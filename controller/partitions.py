"""Daily partitions of the tables that grow with the fleet (raw telemetry and device events) on
PostgreSQL, where retention then drops whole days instead of deleting rows. SQLite has none:
every method is a no-op there and retention deletes rows.

A partition holds one UTC day of arrival (``received_at``) and is named after it
(``telemetry_p20260520``). Partitions are made ahead of time (:meth:`Partitions.ensure_ahead`,
at start and by each maintenance tick) and on demand for any arrival time a writer is about to
store (:meth:`Partitions.ensure`), each in a short transaction of its own: creating one locks
its parent table, which must not wait on the writer's own transaction.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import exc, text

if TYPE_CHECKING:
    from controller.store import Store

log = logging.getLogger(__name__)

PARTITIONED = ("telemetry", "events")
DAY_S = 86400
# Days made ahead of today, so that midnight never waits on DDL.
AHEAD_DAYS = 3


def _create_sql(table: str, day: int) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(table, day)} PARTITION OF {table}"
        f" FOR VALUES FROM ({day * DAY_S}) TO ({(day + 1) * DAY_S})"
    )


def partition_name(table: str, day: int) -> str:
    return f"{table}_p{time.strftime('%Y%m%d', time.gmtime(day * DAY_S))}"


def day_of(name: str, table: str) -> int | None:
    """The day (since the epoch) a partition of ``table`` holds, None for another table's."""
    prefix = f"{table}_p"
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        return None
    try:
        return calendar.timegm(time.strptime(name[len(prefix) :], "%Y%m%d")) // DAY_S
    except ValueError:
        return None


class Partitions:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        # (table, day) known to exist; cleared for the days retention drops.
        self._known: set[tuple[str, int]] = set()

    @property
    def enabled(self) -> bool:
        return self.store.is_postgresql

    def ensure(self, table: str, received_at: Iterable[float]) -> None:
        """Partitions of ``table`` for each of these arrival times, made now where missing."""
        if not self.enabled:
            return
        days = {int(t // DAY_S) for t in received_at}
        with self._lock:
            missing = sorted(d for d in days if (table, d) not in self._known)
        if not missing:
            return
        if self.store.in_transaction():
            # The caller's transaction may already hold locks on the table, which a second
            # connection's DDL would wait for forever: made in that transaction instead, and not
            # remembered, since it may yet roll back. Writers that can, ensure before they begin.
            with self.store.transaction() as tx:
                tx.lock("partitions")
                for day in missing:
                    if tx.query("SELECT to_regclass(?) AS found", (partition_name(table, day),))[0]["found"] is None:
                        tx.execute(_create_sql(table, day))
            return
        self._create(table, missing)

    def ensure_ahead(self, now: float) -> None:
        for table in PARTITIONED:
            self.ensure(table, [now + k * DAY_S for k in range(-1, AHEAD_DAYS + 1)])

    def _create(self, table: str, days: list[int]) -> None:
        # Its own connection and transaction, committed before the caller writes (see above).
        try:
            with self.store.engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('partitions'))"))
                for day in days:
                    connection.exec_driver_sql(_create_sql(table, day))
        except exc.SQLAlchemyError as error:
            raise self.store.translate(error, f"cannot create partitions of {table}") from None
        with self._lock:
            self._known.update((table, d) for d in days)
        log.info("partitions ready table=%s days=%s", table, ",".join(partition_name(table, d) for d in days))

    def days(self, table: str) -> list[int]:
        rows = self.store.query(
            "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ?",
            (table,),
        )
        return sorted(d for d in (day_of(r["name"], table) for r in rows) if d is not None)

    def drop_before(self, table: str, cutoff: float) -> int:
        """Drop the partitions of ``table`` wholly older than ``cutoff``; the rows they held."""
        if not self.enabled:
            return 0
        removed = 0
        for day in self.days(table):
            if (day + 1) * DAY_S > cutoff:
                continue
            name = partition_name(table, day)
            with self.store.transaction() as tx:
                row = tx.query_one(f"SELECT count(*) AS n FROM {name}")
                tx.execute(f"DROP TABLE IF EXISTS {name}")
            removed += int(row["n"]) if row else 0
            with self._lock:
                self._known.discard((table, day))
            log.info("partition dropped table=%s partition=%s", table, name)
        return removed
