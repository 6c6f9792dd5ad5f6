"""Two ingest processes writing batches of the same devices at once into one PostgreSQL database
(each with its own connection pool, as two `serve --roles ingest` processes): neither deadlocks
the other, every window is stored once. Measured before the fix: the bench's two and four ingest
processes deadlocked on the devices' rows (each batch touched them in arrival order), batches
failed and were sent again, and with four none was stored any more."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.topics import Kind, Topic

from controller.transport import Inbound, Transport
from tests.unit.controller.helpers import Parts

DEVICES = 40
ROUNDS = 15


def ingest_process(root: Path, database: str) -> tuple[Parts, Transport]:
    parts = Parts(root, database_url=database)
    transport = Transport(parts.settings, parts.fleet, parts.telemetry, parts.artifacts)
    return parts, transport


def batch(device_ids: list[str], seq: int) -> list[Inbound]:
    now = time.time()
    return [
        Inbound(
            Topic(d, Kind.TELEMETRY),
            fleet_pb2.Telemetry(
                device_id=d, seq=seq, window_start_ms=seq * 1000, window_end_ms=seq * 1000 + 999
            ),
            now,
            False,
        )
        for d in device_ids
    ]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_ingest_processes_store_batches_of_the_same_devices_without_deadlocks(
    tmp_path: Path, store_url: str
) -> None:
    database = store_url
    first, a = ingest_process(tmp_path / "a", database)
    _, b = ingest_process(tmp_path / "b", database)
    ids = [f"dev-{i:02}" for i in range(DEVICES)]
    for device_id in ids:
        first.fleet.register(device_id)
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def run(transport: Transport, seqs: range, rng: random.Random) -> None:
        try:
            for seq in seqs:
                order = ids[:]
                rng.shuffle(order)
                start.wait(30)
                # The ingest worker's own path: one transaction per batch, acknowledged once committed.
                transport._ingest(batch(order, seq))
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=run, args=(a, range(1, ROUNDS + 1), random.Random(1))),
        threading.Thread(target=run, args=(b, range(ROUNDS + 1, 2 * ROUNDS + 1), random.Random(2))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    rows = first.store.query("SELECT count(*) AS n, count(DISTINCT (device_id, seq)) AS d FROM telemetry")
    assert rows == [{"n": 2 * ROUNDS * DEVICES, "d": 2 * ROUNDS * DEVICES}]
    assert a.windows_acknowledged == b.windows_acknowledged == ROUNDS * DEVICES
