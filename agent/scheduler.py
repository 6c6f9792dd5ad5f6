"""Weighted fair sharing of inference between tenants.

:class:`FairQueue` is the pure part: one bounded lane per tenant (drop-oldest,
since a live sensor's newest sample is the one worth running; a replayed file
instead waits for room, :meth:`Scheduler.submit_when_room`) and start-time
fair queueing over *measured cost*. Each lane has a virtual ``finish`` tag; the
next job comes from the backlogged lane with the smallest tag, and running a job
of ``cost`` seconds advances its lane by ``cost / weight``. Over any busy period
each tenant gets CPU time in proportion to its weight, whatever its model
costs. A lane that was idle restarts at the current virtual time, so idling
banks no credit. With several workers the cost is unknown when a job starts;
the lane is charged its running average at once and corrected when the job
ends, so one tenant cannot grab every worker at the same tag.

:class:`Scheduler` is the thin threaded executor: a worker pool that pops, runs
and reports the cost. Fairness is tested on :class:`FairQueue` with a fake clock.

A local app's call need not cross to a worker and back: when no job waits and fewer
jobs run than there are workers, :meth:`Scheduler.claim` lets the caller run its job
on its own thread, charged to its lane like any other (two thread hand-offs cost more
than a small model's run). At most ``workers`` jobs run at once either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Weight of the newest cost in a lane's running average.
COST_SMOOTHING = 0.2
# How often a source waiting for room in its lane checks whether it should stop waiting.
ROOM_POLL_S = 0.1


@dataclass
class _Lane:
    weight: float
    bound: int
    items: deque[Any] = field(default_factory=deque)
    finish: float = 0.0
    estimate: float = 0.0
    running: int = 0
    dropped: int = 0
    busy_s: float = 0.0
    # One job at a time, in order: a stateful model needs each run's state for the next.
    serial: bool = False


@dataclass(frozen=True)
class Ticket:
    """A popped job: give it back to :meth:`FairQueue.done` with what it cost."""

    tenant: str
    item: Any
    charged: float


class FairQueue:
    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}
        self._vtime = 0.0

    def configure(self, tenant: str, weight: float, bound: int, serial: bool = False) -> None:
        if weight <= 0 or bound < 1:
            raise ValueError(f"tenant {tenant!r}: weight must be > 0 and bound >= 1")
        lane = self._lanes.get(tenant)
        if lane is None:
            self._lanes[tenant] = _Lane(weight, bound, finish=self._vtime, serial=serial)
            return
        lane.weight, lane.bound, lane.serial = weight, bound, serial
        while len(lane.items) > bound:
            lane.items.popleft()
            lane.dropped += 1

    def remove(self, tenant: str) -> list[Any]:
        """Forget the tenant; returns the items it had waiting."""
        lane = self._lanes.pop(tenant, None)
        return list(lane.items) if lane else []

    def has(self, tenant: str) -> bool:
        return tenant in self._lanes

    def has_room(self, tenant: str) -> bool:
        """Whether the tenant's lane takes one more item without dropping its oldest."""
        lane = self._lanes.get(tenant)
        return lane is not None and len(lane.items) < lane.bound

    def tenants(self) -> list[str]:
        return sorted(self._lanes)

    def push(self, tenant: str, item: Any) -> list[Any]:
        """Queue ``item``; returns the older items dropped to make room (oldest first)."""
        lane = self._lanes[tenant]
        if not lane.items and not lane.running:
            lane.finish = max(lane.finish, self._vtime)
        dropped = []
        while len(lane.items) >= lane.bound:
            dropped.append(lane.items.popleft())
        lane.items.append(item)
        lane.dropped += len(dropped)
        return dropped

    def pop(self) -> Ticket | None:
        ready = [
            (lane.finish, tenant)
            for tenant, lane in self._lanes.items()
            if lane.items and not (lane.serial and lane.running)
        ]
        if not ready:
            return None
        _, tenant = min(ready)
        lane = self._lanes[tenant]
        return self._start(tenant, lane, lane.items.popleft())

    def claim(self, tenant: str, item: Any) -> Ticket | None:
        """``item`` popped at once for its caller to run, when no job of any lane waits (so no
        lane is passed over) and its own lane may start one; else None and nothing changes."""
        lane = self._lanes.get(tenant)
        if lane is None or (lane.serial and lane.running) or self.waiting():
            return None
        # What push() then pop() would do with every lane empty, without queueing the item.
        if not lane.running:
            lane.finish = max(lane.finish, self._vtime)
        return self._start(tenant, lane, item)

    def _start(self, tenant: str, lane: _Lane, item: Any) -> Ticket:
        """Start ``item``, the lane's next job: charged its lane's running average at once."""
        self._vtime = max(self._vtime, lane.finish)
        charged = lane.estimate / lane.weight
        lane.finish += charged
        lane.running += 1
        return Ticket(tenant, item, charged)

    def waiting(self) -> bool:
        """Whether any lane has a job waiting to start."""
        return any(lane.items for lane in self._lanes.values())

    def done(self, ticket: Ticket, cost_s: float) -> None:
        lane = self._lanes.get(ticket.tenant)
        if lane is None:
            return
        lane.running -= 1
        lane.busy_s += cost_s
        lane.finish += cost_s / lane.weight - ticket.charged
        lane.estimate = (
            cost_s if lane.estimate == 0 else (1 - COST_SMOOTHING) * lane.estimate + COST_SMOOTHING * cost_s
        )

    def depth(self, tenant: str) -> int:
        lane = self._lanes.get(tenant)
        return len(lane.items) if lane else 0

    def dropped(self, tenant: str) -> int:
        """Items dropped from the tenant's lane since it was configured."""
        lane = self._lanes.get(tenant)
        return lane.dropped if lane else 0

    def drain_busy(self, tenant: str) -> float:
        """Seconds of work the tenant's jobs took since the last call."""
        lane = self._lanes.get(tenant)
        if lane is None:
            return 0.0
        busy, lane.busy_s = lane.busy_s, 0.0
        return busy

    def busy(self) -> bool:
        return any(lane.items or lane.running for lane in self._lanes.values())


Runner = Callable[[str, Any], None]


class Scheduler:
    """Worker threads that run what the :class:`FairQueue` hands out."""

    def __init__(self, workers: int, run: Runner, clock: Callable[[], float] = time.perf_counter) -> None:
        self.workers = max(1, workers)
        self._run = run
        self._clock = clock
        self._queue = FairQueue()
        # A plain lock under the condition: cheaper to take than the default RLock, and
        # nothing here takes it twice.
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        # Sources that wait for room in their lane (submit_when_room) wait here, never on
        # _cond: a wake-up meant for a worker is never spent on them.
        self._room = threading.Condition(lock)
        self._room_waiters = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        # Jobs running now, on workers or on their callers' threads (claim()).
        self._running = 0

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"sched-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def configure(self, tenant: str, weight: float, bound: int, serial: bool = False) -> None:
        with self._cond:
            self._queue.configure(tenant, weight, bound, serial)

    def remove(self, tenant: str) -> list[Any]:
        with self._cond:
            return self._queue.remove(tenant)

    def submit(self, tenant: str, item: Any) -> list[Any]:
        """Queue one job; returns the jobs dropped for it (``[item]`` itself once stopping). Never blocks."""
        with self._cond:
            if self._stopping or not self._queue.has(tenant):
                return [item]
            dropped = self._queue.push(tenant, item)
            self._cond.notify()
            return dropped

    def submit_when_room(self, tenant: str, make: Callable[[], Any], give_up: threading.Event) -> list[Any]:
        """Queue the job ``make()`` builds once the tenant's lane has room: back-pressure for a
        source that loses nothing by waiting (a file replayed as fast as the model takes it),
        where :meth:`submit` drops the oldest. The job is built when it is queued, so its
        queueing time starts there. Returns ``[job]`` when it was not queued (``give_up`` set,
        the tenant gone, stopping), else nothing dropped: ``[]``."""
        with self._cond:
            while not self._stopping and not self._queue.has_room(tenant) and self._queue.has(tenant):
                if give_up.is_set():
                    return [make()]
                self._room_waiters += 1
                try:
                    self._room.wait(ROOM_POLL_S)
                finally:
                    self._room_waiters -= 1
            item = make()
            if self._stopping or not self._queue.has(tenant):
                return [item]
            dropped = self._queue.push(tenant, item)
            self._cond.notify()
            return dropped

    def claim(self, tenant: str, item: Any) -> Ticket | None:
        """A ticket to run ``item`` on the caller's own thread now, or None (then :meth:`submit`
        it). The caller times the job with :attr:`clock` and hands the ticket to :meth:`release`."""
        with self._cond:
            if self._stopping or self._running >= self.workers:
                return None
            ticket = self._queue.claim(tenant, item)
            if ticket is not None:
                self._running += 1
            return ticket

    def release(self, ticket: Ticket, cost_s: float) -> None:
        """A claimed job ended after ``cost_s`` of :attr:`clock`."""
        with self._cond:
            self._queue.done(ticket, cost_s)
            self._running -= 1
            if self._queue.waiting():
                self._cond.notify()  # a worker held back while the caller had the share

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def drain_busy(self, tenant: str) -> float:
        with self._cond:
            return self._queue.drain_busy(tenant)

    def depth(self, tenant: str) -> int:
        with self._cond:
            return self._queue.depth(tenant)

    def _work(self) -> None:
        finished: Ticket | None = None
        cost = 0.0
        while True:
            # One lock round per job: the finished job is reported and the next one taken
            # together. No other worker is woken here: the job that finished can only have
            # readied its own serial lane, and this worker takes that next itself.
            with self._cond:
                if finished is not None:
                    self._queue.done(finished, cost)
                    self._running -= 1
                ticket = self._pop()
                while ticket is None:
                    if self._stopping:
                        return
                    self._cond.wait()
                    ticket = self._pop()
            start = self._clock()
            try:
                self._run(ticket.tenant, ticket.item)
            except Exception:
                # The runner reports its own errors; this only keeps the worker alive.
                log.exception("scheduled job crashed tenant=%s", ticket.tenant)
            cost = self._clock() - start
            finished = ticket

    def _pop(self) -> Ticket | None:
        # Caller holds self._cond. A job its caller runs takes a worker's share of the CPU.
        if self._running >= self.workers:
            return None
        ticket = self._queue.pop()
        if ticket is not None:
            self._running += 1
            if self._room_waiters:
                self._room.notify_all()  # its lane has room now
        return ticket

    def stop(self, timeout: float) -> bool:
        """Finish queued and in-flight work for up to ``timeout`` s; True if all finished."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._room.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
