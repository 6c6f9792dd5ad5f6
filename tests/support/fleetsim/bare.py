"""Bare paho subscribers: the transport's own figure, measured beside the controller in the same run.

A process of this module holds any number of plain paho clients (each its own
broker login and connection, on the network loop of :mod:`tests.support.fleetsim.driver`)
subscribed to one topic filter, and counts what they receive: messages, bytes,
and when the last one came. With ``decode`` each payload is parsed as a telemetry
window, as the controller must before storing it, and windows are also counted
once each (by device and seq: a device sends a window again until the
controller acknowledges it). Commands over the pipe:
``("stats",)`` -> :class:`BareStats`; ``("stop",)`` -> the last stats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from edgefleet_proto import fleet_pb2
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.fleetsim.driver import Driver
from tests.support.fleetsim.worker import raise_open_files_limit

RECONNECT_S = 1.0


@dataclass
class BareStats:
    clients: int = 0
    subscribed: int = 0
    messages: int = 0
    bytes: int = 0
    # Distinct telemetry windows (device, seq) among the messages, with ``decode``.
    windows: int = 0
    # time.monotonic() of the last message (shared by the processes of one machine).
    last_at: float = 0.0
    cpu_s: float = 0.0

    def add(self, other: BareStats) -> BareStats:
        return BareStats(
            self.clients + other.clients,
            self.subscribed + other.subscribed,
            self.messages + other.messages,
            self.bytes + other.bytes,
            self.windows + other.windows,
            max(self.last_at, other.last_at),
            self.cpu_s + other.cpu_s,
        )


class BareWorker:
    def __init__(
        self,
        conn: Connection,
        logins: list[tuple[str, str]],
        host: str,
        port: int,
        topic: str,
        decode: bool,
        connect_rate: float,
    ) -> None:
        self.conn = conn
        self.topic = topic
        self.decode = decode
        self.driver = Driver()
        self.stats = BareStats(clients=len(logins))
        self._seen: set[tuple[str, int]] = set()
        self.process = psutil.Process()
        self.stopped = False
        now = time.monotonic()
        for i, (username, password) in enumerate(logins):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
            client.username_pw_set(username, password)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.connect_async(host, port, keepalive=60)
            self.driver.add(client, lambda: None, lambda c=client: self._lost(c))
            self.driver.at(now + i / connect_rate, lambda c=client: self._attempt(c))
        self.driver.watch(conn, self._command)

    def _attempt(self, client: mqtt.Client) -> None:
        try:
            client.reconnect()
        except OSError:
            self.driver.at(time.monotonic() + RECONNECT_S, lambda: self._attempt(client))

    def _lost(self, client: mqtt.Client) -> None:
        if not self.stopped:
            self.driver.at(time.monotonic() + RECONNECT_S, lambda: self._attempt(client))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.stats.subscribed += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.decode:
            window = fleet_pb2.Telemetry.FromString(msg.payload)
            key = (window.device_id, window.seq)
            if key not in self._seen:
                self._seen.add(key)
                self.stats.windows += 1
        self.stats.messages += 1
        self.stats.bytes += len(msg.payload)
        self.stats.last_at = time.monotonic()

    def _snapshot(self) -> BareStats:
        cpu = self.process.cpu_times()
        self.stats.cpu_s = cpu.user + cpu.system
        return BareStats(**vars(self.stats))

    def _command(self) -> None:
        command = self.conn.recv()
        if command[0] == "stats":
            self.conn.send(self._snapshot())
        elif command[0] == "stop":
            self.stopped = True
            for peer in self.driver.peers:
                peer.client.disconnect()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(p.sock is not None for p in self.driver.peers):
                self.driver.run_once(0.05)
            self.conn.send(self._snapshot())
        else:
            self.conn.send(ValueError(f"unknown command {command!r}"))

    def run(self) -> None:
        self.conn.send(("ready", self._snapshot()))
        while not self.stopped:
            self.driver.run_once()


def main(
    conn: Connection,
    logins: list[tuple[str, str]],
    host: str,
    port: int,
    topic: str,
    decode: bool,
    connect_rate: float,
) -> None:
    raise_open_files_limit()
    logging.basicConfig(level=logging.WARNING)
    BareWorker(conn, logins, host, port, topic, decode, connect_rate).run()
