"""Controller roles on real processes: several `edgefleet controller serve --roles ...` processes
sharing one PostgreSQL database, a real mosquitto and simulated devices speaking the agent's
own protocol code (tests/support/fleetsim).

- ingest processes share the telemetry through an MQTT 5 shared subscription: each stores some,
  every window a device saw acknowledged is stored, none twice;
- the rollout engine runs where its lease is held: the holder is killed with SIGKILL in the
  middle of a rollout, the standby takes the lease over within 10 s and completes the rollout,
  and the rollout's event log has every action once.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.fleetsim import DeviceLogin, SimFleet, SimSettings
from tests.support.localfleet import Controller
from tests.support.models import dense_of_size
from tests.support.waiting import wait_until

# Several controller processes share a database on PostgreSQL only (the store_url fixture's).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

# A takeover must happen within this many seconds of the holder's death (controller.leases).
TAKEOVER_S = 10.0


@pytest.fixture
def processes() -> Iterator[list[Controller]]:
    """Controller processes a test starts; all stopped at the end, whatever happened."""
    started: list[Controller] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def init(broker: Broker, tmp_path: Path, database: str) -> Controller:
    api = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    api.init("--database", database)
    return api


def register(api: Controller, count: int) -> tuple[list[DeviceLogin], str]:
    """Devices registered in one batch, and the controller's public key they are provisioned with."""
    response = api.api(
        "POST", "/v1/device-batches", json={"devices": [{"device_id": f"sim-{i:03}"} for i in range(count)]}
    )
    assert response.status_code == 201, response.text
    creds = response.json()
    return [DeviceLogin(c["device_id"], c["mqtt_password"]) for c in creds], creds[0]["controller_public_key"]


def query(database: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


def test_ingest_processes_share_the_telemetry_and_store_every_window_once(
    broker: Broker, tmp_path: Path, store_url: str, processes: list[Controller]
) -> None:
    database = store_url
    api = init(broker, tmp_path, database)
    # The API, chunk serving and the engine in one process; telemetry to two ingest processes.
    api.roles = "api,chunks,engine"
    processes.append(api.start())
    workers = [api.role_process("ingest", instance=n) for n in (1, 2)]
    for worker in workers:
        processes.append(worker.start())
    logins, key = register(api, 30)
    settings = SimSettings("127.0.0.1", broker.port, key, tmp_path / "sim", telemetry_interval_s=0.5)
    fleet = SimFleet(logins, settings, processes=1, log_dir=tmp_path / "fleet").start()
    try:
        fleet.wait_connected(60)
        # A device cannot take an ingest process's session by sending its client id: the broker
        # makes every client id its username's.
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgefleet-controller-1")
        intruder.username_pw_set(logins[0].device_id, logins[0].password)
        intruder.connect("127.0.0.1", broker.port)
        intruder.loop_start()
        fleet.wait(lambda s: s.acknowledged >= 400, 120, "400 windows acknowledged")
        intruder.loop_stop()
        intruder.disconnect()
    finally:
        last = fleet.stop()
    assert last is not None
    for worker in workers:
        worker.stop()
    shares = [int(re.findall(r"windows_acknowledged=(\d+)", w.log_file.read_text())[-1]) for w in workers]
    assert all(share > 0 for share in shares), shares
    for worker in workers:
        assert "mqtt disconnected" not in worker.log_file.read_text()
    [(rows, distinct)] = query(
        database, "SELECT count(*), count(DISTINCT (device_id, seq, window_start_ms)) FROM telemetry"
    )
    # Every window a device saw acknowledged (and so dropped from its outbox) is stored, once;
    # the rest were closed but not acknowledged when the devices stopped.
    assert rows == distinct
    assert last.acknowledged <= rows <= last.windows
    # Acknowledged windows are each worker's; resends found stored before are acknowledged again.
    assert sum(shares) >= last.acknowledged


def test_the_engine_lease_is_taken_over_after_a_kill_and_every_action_is_logged_once(
    broker: Broker, tmp_path: Path, store_url: str, processes: list[Controller]
) -> None:
    database = store_url
    api = init(broker, tmp_path, database)
    api.roles = "api,ingest,chunks"
    processes.append(api.start())
    engine_a = api.role_process("engine", instance=1)
    processes.append(engine_a.start())
    assert engine_a.proc is not None and engine_a.proc.pid is not None
    holder = wait_until(lambda: lease_holder(database), 30, "the engine lease taken")
    assert f":{engine_a.proc.pid}:" in holder
    engine_b = api.role_process("engine", instance=2)
    processes.append(engine_b.start())
    assert engine_b.proc is not None

    logins, key = register(api, 6)
    settings = SimSettings("127.0.0.1", broker.port, key, tmp_path / "sim", telemetry_interval_s=1.0)
    fleet = SimFleet(logins, settings, processes=1, log_dir=tmp_path / "fleet").start()
    try:
        fleet.wait_connected(60)
        version = api.cli(
            "models",
            "upload",
            str(dense_of_size(tmp_path / "m.onnx", 0.2)),
            "--name",
            "dense",
            "--version",
            "1",
        )
        rollout = api.cli(
            "rollouts", "create", "--model", "dense", "--version", "1", "--all",
            "--wave", "2:4", "--wave", "2:4", "--wave", "2:2",
        )  # fmt: skip
        rollout_id = rollout["id"]
        # The first wave done and soaking under A: the rollout is well under way.
        wait_until(lambda: "start_soak" in kinds(api, rollout_id), 120, "the first wave soaking")
        os.kill(engine_a.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        engine_a.proc.wait()
        engine_a.proc = None
        wait_until(
            lambda: f":{engine_b.proc.pid}:" in lease_holder(database),  # type: ignore[union-attr]
            TAKEOVER_S + 5,
            "the standby to take the engine lease",
            interval=0.1,
        )
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < TAKEOVER_S, f"the standby took the lease {takeover_s:.1f} s after the kill"
        final = wait_until(
            lambda: (r := api.api("GET", f"/v1/rollouts/{rollout_id}").json())["state"] != "running" and r,
            120,
            "the rollout to end under the new holder",
            interval=0.5,
        )
        assert final["state"] == "succeeded", final
        fleet.wait_active(version["digest"], 60, 6)
    finally:
        fleet.stop()
    events = api.api("GET", f"/v1/rollouts/{rollout_id}/events").json()
    counted = Counter((e["kind"], e["wave"], e["device_id"]) for e in events)
    assert [k for k, n in counted.items() if n > 1] == []
    by_kind = Counter(e["kind"] for e in events)
    assert (by_kind["start_wave"], by_kind["set_desired"], by_kind["complete"]) == (3, 6, 1), by_kind
    # The engine that took over did part of the work.
    assert "lease taken lease=rollouts" in engine_b.log_file.read_text()
    assert "desired state set rollout=" in engine_b.log_file.read_text()


def lease_holder(database: str) -> str:
    rows = query(
        database,
        "SELECT holder FROM leases WHERE name = 'rollouts' AND expires_at > extract(epoch from now())",
    )
    return str(rows[0][0]) if rows else ""


def kinds(api: Controller, rollout_id: str) -> list[str]:
    return [e["kind"] for e in api.api("GET", f"/v1/rollouts/{rollout_id}/events").json()]
