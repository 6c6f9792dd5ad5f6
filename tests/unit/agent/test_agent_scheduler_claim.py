"""A caller running its own job (Scheduler.claim): only when no job waits and a share is free,
charged like a worker's run, and never more jobs at once than there are workers."""

from __future__ import annotations

import threading

from agent.scheduler import FairQueue, Scheduler


def test_a_claim_passes_over_no_waiting_job_and_is_charged_like_a_popped_one() -> None:
    q = FairQueue()
    q.configure("app", 1.0, bound=4)
    q.configure("cam", 2.0, bound=4)
    ticket = q.claim("app", "call")
    assert ticket is not None and (ticket.tenant, ticket.item) == ("app", "call")
    q.done(ticket, 0.5)
    assert q.drain_busy("app") == 0.5 and q.depth("app") == 0
    q.push("cam", "frame")
    # A camera frame waits: the call queues behind it, and nothing changed.
    assert q.claim("app", "call") is None
    assert (q.depth("app"), q.depth("cam")) == (0, 1)
    assert q.claim("nobody", "call") is None


def test_a_serial_lane_running_a_job_cannot_claim_another() -> None:
    q = FairQueue()
    q.configure("vad", 1.0, bound=4, serial=True)
    first = q.claim("vad", 1)
    assert first is not None
    assert q.claim("vad", 2) is None and q.depth("vad") == 0
    q.done(first, 0.1)
    assert q.claim("vad", 2) is not None


def test_claimed_jobs_take_worker_shares_and_release_wakes_a_held_back_worker() -> None:
    ran: list[str] = []
    done = threading.Event()

    def run(tenant: str, item: str) -> None:
        ran.append(item)
        done.set()

    scheduler = Scheduler(1, run)
    scheduler.configure("app", 1.0, 4)
    scheduler.configure("cam", 1.0, 4)
    scheduler.start()
    ticket = scheduler.claim("app", "call")
    assert ticket is not None
    # The one share is the caller's: a second claim fails, and a queued frame waits for it.
    assert scheduler.claim("app", "call 2") is None
    scheduler.submit("cam", "frame")
    assert not done.wait(0.2) and ran == []
    scheduler.release(ticket, 0.01)
    assert done.wait(5) and ran == ["frame"]
    assert scheduler.stop(5)
    assert scheduler.claim("app", "late") is None
