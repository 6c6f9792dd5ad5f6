"""Broker identity and end-to-end telemetry acknowledgement, on real processes.

A device's credentials must not let it take over another client's MQTT
session (the broker binds each client id to its username), and no telemetry
window may be lost while the controller's session is lost: the agent keeps a
window until the controller acknowledges having stored it.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.agent_process import AgentProcess
from tests.support.broker import CONTROLLER_USER, Broker
from tests.support.localfleet import Controller, register_agent
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


class Rogue:
    """Reconnects again and again with one device's credentials under other clients' ids."""

    def __init__(self, port: int, username: str, password: str, client_ids: list[str]) -> None:
        self.port, self.username, self.password, self.client_ids = port, username, password, client_ids
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Rogue:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            client_id = self.client_ids[attempt % len(self.client_ids)]
            attempt += 1
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            client.username_pw_set(self.username, self.password)
            accepted = threading.Event()

            def on_connect(
                c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any, accepted: threading.Event = accepted
            ) -> None:
                if not rc.is_failure:
                    accepted.set()

            client.on_connect = on_connect
            try:
                # Clean start: taking over a persistent session this way discards it.
                client.connect("127.0.0.1", self.port, clean_start=True)
            except OSError:
                self.stop.wait(0.2)
                continue
            client.loop_start()
            if accepted.wait(2):
                self.connections += 1
            self.stop.wait(random.uniform(0.2, 0.5))
            client.disconnect()
            client.loop_stop()


def controller_disconnects(controller: Controller) -> int:
    return controller.log_file.read_text(errors="replace").count("mqtt disconnected")


def agent_disconnects(agent: AgentProcess) -> int:
    return agent.log().count("broker disconnected")


def taken_over(broker: Broker, client_id: str) -> int:
    """Times mosquitto closed a client's connection because another connected with its id."""
    text = broker.log_file.read_text(errors="replace")
    return text.count(f"Client {client_id} already connected, closing old connection")


def outbox_seq(agent: AgentProcess) -> int:
    """The last telemetry sequence number the (stopped) agent gave a window."""
    db = sqlite3.connect(agent.data_dir / "outbox.db")
    try:
        (value,) = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        return int(value)
    finally:
        db.close()


def stored_seqs(controller: Controller, device_id: str) -> list[int]:
    rows = controller.api("GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 1000}).json()
    return sorted(int(r["seq"]) for r in rows)


def assert_every_window_stored_once(controller: Controller, agent: AgentProcess) -> list[int]:
    """Stop the agent (its last window is flushed), then every seq it made is stored exactly once."""
    assert agent.stop() == 0, agent.log()
    last = outbox_seq(agent)
    expected = list(range(1, last + 1))

    def all_stored() -> list[int] | None:
        seqs = stored_seqs(controller, agent.device_id)
        return seqs if seqs == expected else None

    seqs = wait_until(all_stored, 60, f"windows 1..{last} stored once each")
    return seqs


def quick_acks(agent: AgentProcess, ack_timeout_s: float) -> None:
    agent.config.write_text(agent.config.read_text() + f"\n[outbox]\nack_timeout_s = {ack_timeout_s}\n")


def test_device_credentials_cannot_take_over_the_controller_or_another_device(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    rogue_creds = controller.cli("devices", "register", "dev-a")
    agent = register_agent(controller, tmp_path / "agents", "dev-b", telemetry_interval=0.3)
    agents.append(agent.start())
    wait_until(lambda: len(stored_seqs(controller, "dev-b")) >= 2, 30, "dev-b's first windows")
    controller_before, agent_before = controller_disconnects(controller), agent_disconnects(agent)

    with Rogue(
        broker.port,
        rogue_creds["mqtt_username"],
        rogue_creds["mqtt_password"],
        [CONTROLLER_USER, "dev-b"],
    ) as rogue:
        time.sleep(8)
    assert rogue.connections >= 10, "the rogue client did connect, again and again"
    assert taken_over(broker, CONTROLLER_USER) == 0 and taken_over(broker, "dev-b") == 0
    assert controller_disconnects(controller) == controller_before, "the controller was disconnected"
    assert agent_disconnects(agent) == agent_before, "dev-b was disconnected"
    assert_every_window_stored_once(controller, agent)


def test_no_window_is_lost_when_the_controller_and_its_broker_session_are_lost(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    agent = register_agent(controller, tmp_path / "agents", "dev-s", telemetry_interval=0.2)
    quick_acks(agent, 2.0)
    agents.append(agent.start())
    wait_until(lambda: len(stored_seqs(controller, "dev-s")) >= 3, 30, "first windows stored")

    # The controller dies mid-ingest, then its persistent session (and every window the
    # broker queued for it) is discarded, as a clean-start login with its credentials does.
    controller.stop(signal.SIGKILL)
    time.sleep(1.5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    wiper = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=CONTROLLER_USER, protocol=mqtt.MQTTv5)
    wiper.username_pw_set(CONTROLLER_USER, controller.mqtt_password())
    connected = threading.Event()
    wiper.on_connect = lambda c, u, f, rc, p: connected.set()
    wiper.connect("127.0.0.1", broker.port, clean_start=True, properties=props)
    wiper.loop_start()
    assert connected.wait(10)
    time.sleep(1.0)  # windows published now reach nobody
    wiper.disconnect()
    wiper.loop_stop()
    controller.start()

    assert_every_window_stored_once(controller, agent)
