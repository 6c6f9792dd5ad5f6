"""Leases: one controller process at a time runs each singleton (the rollout runner, the
maintenance loop), and another takes over within seconds when it dies, however it dies.

A lease is a row of the ``leases`` table: its holder (one process's id), a generation and
when it runs out. The holder renews it every :data:`RENEW_S`; any other process may take it
once it has run out (:data:`TTL_S` after the last renewal), which raises the generation. Every
comparison is made by the database's clock, so the processes' own clocks may disagree.

Why a row rather than a PostgreSQL advisory lock on a connection of its own: the row is the
same portable SQL on both backends; a holder that lost its database connection (a network
cut, a failover) cannot go on believing it holds the lock, as it could with a session lock
whose connection the server has not noticed is gone; and the generation is a fencing token.
The price is the takeover delay: at most TTL_S + RENEW_S (7 s) after a kill -9, where a
dead connection's advisory lock is released at once.

Fencing: a process paused (or cut off) past its lease may wake up and act on a stale view
while another already holds the lease. :meth:`Lease.fence` reads the row in the acting
transaction (``FOR SHARE`` on PostgreSQL: a takeover waits for that transaction, and once it
committed the fence fails) and raises :class:`LeaseLost` unless this process is still the
holder, so the whole action rolls back and is done by the new holder only.

A SQLite database belongs to one controller process (controller.database_lock): there a
lease is ``exclusive``, held from the start and never written.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from controller.errors import StoreError
from controller.store import Store

log = logging.getLogger(__name__)

# A holder that stopped renewing loses its lease this long after its last renewal.
TTL_S = 6.0
# How often the holder renews, and a process that does not hold a lease tries to take it.
RENEW_S = 1.0

# The database's clock in seconds since the epoch.
_NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}

ROLLOUTS = "rollouts"
MAINTENANCE = "maintenance"


class LeaseLost(StoreError):
    """This process no longer holds the lease it acted under: the action was rolled back."""


def process_id() -> str:
    """An id for this controller process, unique across restarts and machines; readable in the table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(
        self,
        store: Store,
        name: str,
        holder: str,
        ttl_s: float = TTL_S,
        exclusive: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.exclusive = exclusive
        self.clock = clock
        self.generation = 0
        # By this process's monotonic clock: until when the lease is surely still ours (the
        # database's expiry is later, counted from when the renewal reached it).
        self._held_until = 0.0

    @property
    def held(self) -> bool:
        return self.exclusive or self.clock() < self._held_until

    def try_acquire(self) -> bool:
        """Renew the lease, or take it if it ran out; whether this process holds it now. A
        database that cannot be reached is not an error here: the lease is simply not renewed."""
        if self.exclusive:
            return True
        sent_at = self.clock()
        now = _NOW[self.store.backend]
        try:
            with self.store.transaction(apart=True) as tx:
                tx.execute(
                    "INSERT INTO leases (name, holder, generation, expires_at, acquired_at)"
                    f" VALUES (?, ?, 1, {now} + ?, {now})"
                    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                    " generation = CASE WHEN leases.holder = excluded.holder THEN leases.generation"
                    " ELSE leases.generation + 1 END,"
                    " acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at"
                    " ELSE excluded.acquired_at END,"
                    " expires_at = excluded.expires_at"
                    f" WHERE leases.holder = excluded.holder OR leases.expires_at < {now}",
                    (self.name, self.holder, self.ttl_s),
                )
                row = tx.query_one("SELECT holder, generation FROM leases WHERE name = ?", (self.name,))
        except StoreError as exc:
            if self.held:
                log.warning("lease not renewed lease=%s holder=%s error=%s", self.name, self.holder, exc)
            return self.held
        if row is None or row["holder"] != self.holder:
            self._held_until = 0.0
            return False
        self.generation = int(row["generation"])
        self._held_until = sent_at + self.ttl_s
        return True

    def release(self) -> None:
        """Let another process take the lease at once (a clean stop)."""
        if self.exclusive or not self.held:
            return
        self._held_until = 0.0
        try:
            with self.store.transaction(apart=True) as tx:
                tx.execute(
                    "UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", (self.name, self.holder)
                )
        except StoreError as exc:
            log.warning("lease not released, it runs out by itself lease=%s error=%s", self.name, exc)

    def fence(self, tx: Store) -> None:
        """Inside the transaction of an action: raise :class:`LeaseLost` (rolling it back) unless
        this process holds the lease, at the generation it took it with."""
        if self.exclusive:
            return
        lock = " FOR SHARE" if tx.is_postgresql else ""
        row = tx.query_one(f"SELECT holder, generation FROM leases WHERE name = ?{lock}", (self.name,))
        if row is None or row["holder"] != self.holder or int(row["generation"]) != self.generation:
            self._held_until = 0.0
            holder = row["holder"] if row else "nobody"
            raise LeaseLost(f"lease {self.name} is now held by {holder}, not by this process ({self.holder})")


class LeaseKeeper:
    """The thread that renews this process's leases and tries to take those it lacks, telling
    ``on_change(lease, held)`` whenever one is taken or lost."""

    def __init__(
        self,
        leases: list[Lease],
        on_change: Callable[[Lease, bool], None],
        interval_s: float = RENEW_S,
    ) -> None:
        self.leases = leases
        self.on_change = on_change
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_held = {lease.name: False for lease in leases}

    def start(self) -> None:
        self._stop.clear()
        self.step()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for lease in self.leases:
            lease.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.step()

    def step(self) -> None:
        for lease in self.leases:
            try:
                held = lease.try_acquire()
            except Exception:
                log.exception("lease step failed lease=%s", lease.name)
                held = lease.held
            if held == self._was_held[lease.name]:
                continue
            self._was_held[lease.name] = held
            if held:
                log.info(
                    "lease taken lease=%s holder=%s generation=%d", lease.name, lease.holder, lease.generation
                )
            else:
                log.warning("lease lost lease=%s holder=%s", lease.name, lease.holder)
            try:
                self.on_change(lease, held)
            except Exception:
                log.exception("lease change not handled lease=%s held=%s", lease.name, held)
