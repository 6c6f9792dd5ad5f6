"""Leases over a real database (SQLite and PostgreSQL): one holder at a time, taken over once it
runs out, released on a clean stop, and fencing: an action under a lease another process took
since rolls back whole. Rollout engine passes are fenced by the engine's lease."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.leases import Lease, LeaseKeeper, LeaseLost
from controller.rollout_plans import Plan, Target, Wave
from controller.rollouts import Rollouts
from controller.store import Store
from tests.support.model_files import add_model
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


class Clock:
    """This process's monotonic clock, moved by the test (the database keeps its own)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[Store]:
    s = Store(store_url or tmp_path / "controller.db")
    yield s
    s.close()


def run_out(store: Store, name: str) -> None:
    """The holder stopped renewing long enough ago: its lease has run out by the database's clock."""
    store.execute("UPDATE leases SET expires_at = 0 WHERE name = ?", (name,))


def test_one_holder_at_a_time_and_a_takeover_raises_the_generation(store: Store) -> None:
    a, b = Lease(store, "engine", "proc-a"), Lease(store, "engine", "proc-b")
    assert a.try_acquire() and a.held and a.generation == 1
    assert not b.try_acquire() and not b.held
    # Renewing keeps the generation: the same holder acts on.
    assert a.try_acquire() and a.generation == 1
    run_out(store, "engine")
    assert b.try_acquire() and b.generation == 2
    assert not a.try_acquire() and not a.held
    row = store.query_one("SELECT holder, generation FROM leases WHERE name = 'engine'")
    assert row == {"holder": "proc-b", "generation": 2}


def test_a_holder_that_stops_renewing_no_longer_counts_itself_the_holder(store: Store) -> None:
    clock = Clock()
    lease = Lease(store, "engine", "proc-a", ttl_s=6.0, clock=clock)
    assert lease.try_acquire()
    clock.now += 5.9
    assert lease.held
    clock.now += 0.2
    assert not lease.held


def test_a_released_lease_is_taken_at_once(store: Store) -> None:
    a, b = Lease(store, "engine", "proc-a"), Lease(store, "engine", "proc-b")
    assert a.try_acquire()
    a.release()
    assert not a.held
    assert b.try_acquire() and b.generation == 2


def test_an_action_under_a_lease_taken_since_rolls_back_whole(store: Store) -> None:
    a, b = Lease(store, "engine", "proc-a"), Lease(store, "engine", "proc-b")
    assert a.try_acquire()
    store.execute("INSERT INTO models (name, created_at) VALUES ('before', 1)")
    # Process a is paused past its lease; b takes it.
    run_out(store, "engine")
    assert b.try_acquire()
    with pytest.raises(LeaseLost, match="held by proc-b"), store.transaction() as tx:
        tx.execute("INSERT INTO models (name, created_at) VALUES ('stale', 2)")
        a.fence(tx)
    assert [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")] == ["before"]
    assert not a.held
    with store.transaction() as tx:
        b.fence(tx)


def test_an_exclusive_lease_is_held_without_a_row(store: Store) -> None:
    lease = Lease(store, "engine", "proc-a", exclusive=True)
    assert lease.held and lease.try_acquire()
    with store.transaction() as tx:
        lease.fence(tx)
    lease.release()
    assert store.query("SELECT * FROM leases") == []


def test_the_keeper_reports_taking_and_losing(store: Store) -> None:
    clock = Clock()
    lease = Lease(store, "engine", "proc-a", clock=clock)
    changes: list[tuple[str, bool]] = []
    keeper = LeaseKeeper([lease], lambda lz, held: changes.append((lz.name, held)))
    keeper.step()
    keeper.step()
    run_out(store, "engine")
    assert Lease(store, "engine", "proc-b").try_acquire()
    keeper.step()
    assert changes == [("engine", True), ("engine", False)]


def test_a_takeover_waits_for_the_fenced_action_under_way(store: Store) -> None:
    """PostgreSQL: the fence holds the lease row (FOR SHARE), so a process taking the lease over
    waits until the action committed, and acts after it, never beside it."""
    if not store.is_postgresql:
        pytest.skip("one SQLite file is one process's; its leases are exclusive")
    a, b = Lease(store, "engine", "proc-a"), Lease(store, "engine", "proc-b")
    assert a.try_acquire()
    run_out(store, "engine")
    fenced, taken = threading.Event(), threading.Event()
    order: list[str] = []

    def take_over() -> None:
        fenced.wait(10)
        b.try_acquire()
        order.append("taken")
        taken.set()

    thread = threading.Thread(target=take_over)
    thread.start()
    with store.transaction(apart=True) as tx:
        a.fence(tx)
        fenced.set()
        assert not taken.wait(0.5)
        tx.execute("INSERT INTO models (name, created_at) VALUES ('acted', 1)")
        order.append("committed")
    thread.join(10)
    assert order == ["committed", "taken"] and b.held


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.registry.upload("adder", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    for i in range(1, 4):
        p.fleet.register(f"dev-{i}", ["lab"])
    return p


def test_an_engine_pass_acts_only_under_the_lease_and_once(parts: Parts) -> None:
    """Two processes' rollout services on one database: the holder's passes act, the other's do
    nothing; after a takeover the old holder's pass (it was paused) rolls back, and the new
    holder's acts. Every action is in the event log once."""
    a_lease = Lease(parts.store, "rollouts", "proc-a")
    parts.rollouts.lease = a_lease
    assert a_lease.try_acquire()
    plan = Plan(Target(tags=("lab",)), waves=(Wave(count=1, soak_s=0), Wave(percent=100, soak_s=0)))
    rollout = parts.rollouts.create("adder", "1", plan_=plan)

    b = Rollouts(parts.store, parts.registry, parts.fleet)
    b_lease = Lease(parts.store, "rollouts", "proc-b")
    b.lease = b_lease
    assert not b_lease.try_acquire()
    first = [m.device_id for m in parts.rollouts.get(rollout.id).devices if m.status != "waiting"]
    report_active(parts, first[0], rollout.digest)
    assert b.advance(rollout.id) == float("inf")
    assert kinds(parts, rollout.id) == ["created", "start_wave", "set_desired"]

    # a is paused past its lease and b takes it; a wakes up and runs its pass: nothing happens.
    run_out(parts.store, "rollouts")
    assert b_lease.try_acquire()
    a_lease._held_until = float("inf")  # a still believes it holds the lease
    parts.rollouts.advance(rollout.id)
    assert kinds(parts, rollout.id) == ["created", "start_wave", "set_desired"]
    b.advance(rollout.id)
    for device in ("dev-1", "dev-2", "dev-3"):
        report_active(parts, device, rollout.digest)
    b.advance(rollout.id)
    events = kinds(parts, rollout.id)
    assert events.count("start_wave") == 2 and events.count("set_desired") == 3 and events[-1] == "complete"
    keys = [
        (r["kind"], r["wave"], r["device_id"])
        for r in parts.store.query(
            "SELECT kind, wave, device_id FROM rollout_events WHERE rollout_id = ?", (rollout.id,)
        )
    ]
    assert len(keys) == len(set(keys))


def report_active(parts: Parts, device_id: str, digest: str) -> None:
    msg = fleet_pb2.ReportedState(device_id=device_id, reported_at_ms=1)
    msg.models.add(tenant="default", artifact_digest=digest, phase=fleet_pb2.MODEL_PHASE_ACTIVE)
    parts.fleet.record_reported(device_id, msg, received_at=1.0)


def kinds(parts: Parts, rollout_id: str) -> list[str]:
    return [e.kind for e in parts.rollouts.events(rollout_id)]
