"""Weighted fair sharing, checked on the pure queue with simulated costs (no threads, no clock)."""

from __future__ import annotations

import threading

import pytest

from agent.scheduler import FairQueue, Scheduler, Ticket


def simulate(
    weights: dict[str, float], costs: dict[str, float], workers: int, horizon: float
) -> dict[str, float]:
    """Saturated tenants on ``workers`` simulated workers; returns the CPU time each got."""
    q = FairQueue()
    for tenant, weight in weights.items():
        q.configure(tenant, weight, bound=4)
        for i in range(4):
            q.push(tenant, i)
    busy = dict.fromkeys(weights, 0.0)
    free_at = [0.0] * workers
    running: list[tuple[float, int, Ticket]] = []
    now = 0.0
    while now < horizon:
        for w in range(workers):
            if free_at[w] <= now and not any(r[1] == w for r in running):
                ticket = q.pop()
                assert ticket is not None
                cost = costs[ticket.tenant]
                running.append((now + cost, w, ticket))
                free_at[w] = now + cost
        running.sort(key=lambda r: r[0])
        now, _, ticket = running.pop(0)
        q.done(ticket, costs[ticket.tenant])
        busy[ticket.tenant] += costs[ticket.tenant]
        q.push(ticket.tenant, 0)  # the source keeps every tenant saturated
    return busy


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_cpu_time_follows_weights_whatever_each_model_costs(workers: int) -> None:
    weights = {"cam": 3.0, "mic": 2.0, "vib": 1.0}
    costs = {"cam": 0.030, "mic": 0.002, "vib": 0.011}
    busy = simulate(weights, costs, workers, horizon=200.0)
    total = sum(busy.values())
    for tenant, weight in weights.items():
        share, want = busy[tenant] / total, weight / sum(weights.values())
        assert abs(share - want) / want < 0.10, (tenant, share, want)


def test_equal_weights_equal_time() -> None:
    busy = simulate({"a": 1.0, "b": 1.0}, {"a": 0.001, "b": 0.010}, 1, horizon=50.0)
    assert busy["a"] / busy["b"] == pytest.approx(1.0, rel=0.05)


def test_full_lane_drops_its_oldest_and_counts_it() -> None:
    q = FairQueue()
    q.configure("cam", 1.0, bound=2)
    assert [q.push("cam", i) for i in range(5)] == [[], [], [0], [1], [2]]
    assert q.dropped("cam") == 3 and q.depth("cam") == 2
    first = q.pop()
    assert first is not None and first.item == 3  # the newest two survive, oldest first


def test_an_idle_tenant_banks_no_credit() -> None:
    q = FairQueue()
    q.configure("busy", 1.0, 8)
    q.configure("idle", 1.0, 8)
    for _ in range(100):  # "busy" runs alone for a long time
        q.push("busy", 0)
        t = q.pop()
        assert t is not None
        q.done(t, 0.01)
    for _ in range(4):
        q.push("busy", 0)
        q.push("idle", 0)
    order = []
    for _ in range(8):
        t = q.pop()
        assert t is not None
        order.append(t.tenant)
        q.done(t, 0.01)
    # Interleaved, not "idle" four times in a row to catch up on its idle second.
    assert order.count("idle") == 4 and "idle,idle,idle" not in ",".join(order)


def test_reconfigure_bound_drops_the_excess_and_remove_forgets() -> None:
    q = FairQueue()
    q.configure("t", 1.0, 4)
    for i in range(4):
        q.push("t", i)
    q.configure("t", 2.0, 1)
    assert q.depth("t") == 1 and q.dropped("t") == 3
    q.remove("t")
    assert q.pop() is None and q.tenants() == []
    with pytest.raises(ValueError, match="weight"):
        q.configure("t", 0.0, 1)


def test_executor_runs_every_job_and_finishes_queued_work_at_stop() -> None:
    done: list[tuple[str, int]] = []
    lock = threading.Lock()

    def run(tenant: str, item: int) -> None:
        if item == 3:
            raise RuntimeError("a crashing job must not kill its worker")
        with lock:
            done.append((tenant, item))

    s = Scheduler(2, run)
    s.configure("a", 1.0, 100)
    s.configure("b", 2.0, 100)
    s.start()
    for i in range(20):
        s.submit("a", i)
        s.submit("b", i)
    assert s.stop(10.0)
    assert sorted(done) == sorted((t, i) for t in "ab" for i in range(20) if i != 3)
    assert s.submit("a", 99) == [99]  # refused after stop: handed back as dropped


def test_a_serial_lane_never_runs_two_jobs_at_once() -> None:
    q = FairQueue()
    q.configure("vad", 1.0, 8, serial=True)
    q.configure("cam", 1.0, 8)
    for i in range(3):
        q.push("vad", i)
        q.push("cam", i)
    popped = [q.pop() for _ in range(4)]
    tickets = [t for t in popped if t is not None]
    # Four workers asked; vad started one job and cam all three, whatever the fair order.
    assert sorted((t.tenant, t.item) for t in tickets) == [("cam", 0), ("cam", 1), ("cam", 2), ("vad", 0)]
    assert q.pop() is None
    q.done(next(t for t in tickets if t.tenant == "vad"), 0.001)
    nxt = q.pop()
    assert nxt is not None and (nxt.tenant, nxt.item) == ("vad", 1)
