"""A simulator process: its share of the fleet's devices on one network loop, steered over a pipe.

The parent (:class:`tests.support.fleetsim.fleet.SimFleet`) sends commands as tuples and
gets one answer per command:

- ``("start",)`` -> the devices connect (paced) and report telemetry from then on;
- ``("stats",)`` -> :class:`WorkerStats` of this process's devices;
- ``("offline", [ids])`` / ``("online", [ids])`` -> those devices disconnect cleanly, or connect again;
- ``("hold", True | False)`` -> telemetry kept in the outboxes, or released at once;
- ``("stop",)`` -> every device says offline and disconnects; the last stats.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import psutil
from edgefleet_proto import fleet_pb2

from agent.telemetry import SystemSampler
from tests.support.fleetsim.device import DeviceLogin, SimDevice, SimSettings
from tests.support.fleetsim.driver import Driver
from tests.support.fleetsim.storage import SharedContent

# How long the system sample that every device of the process sends stays current.
SYSTEM_SAMPLE_S = 1.0
STOP_FLUSH_S = 5.0


@dataclass
class WorkerStats:
    devices: int = 0
    connected: int = 0
    # Telemetry windows closed, and acknowledged by the controller (stored, left the outbox).
    windows: int = 0
    acknowledged: int = 0
    # Devices by the digest their default tenant serves ("" none), and by digests they refused or failed.
    active: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    # Chunk bytes the devices accepted (each checked against the manifest).
    chunk_bytes: int = 0
    cpu_s: float = 0.0

    def add(self, other: WorkerStats) -> WorkerStats:
        return WorkerStats(
            self.devices + other.devices,
            self.connected + other.connected,
            self.windows + other.windows,
            self.acknowledged + other.acknowledged,
            self.active + other.active,
            self.failed + other.failed,
            self.chunk_bytes + other.chunk_bytes,
            self.cpu_s + other.cpu_s,
        )


def raise_open_files_limit() -> int:
    """Soft limit of open files up to the hard one: a socket and the outbox's files per device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Worker:
    def __init__(
        self,
        conn: Connection,
        logins: list[DeviceLogin],
        settings: SimSettings,
        index: int,
        connect_rate: float,
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.driver = Driver()
        self.content = SharedContent(settings.state_dir / f".shared-{index}")
        self._sampler = SystemSampler(settings.state_dir)
        self._sample = self._sampler.sample()
        self._sampled_at = time.monotonic()
        samples = np.load(settings.samples) if settings.samples is not None else None
        self.devices = [SimDevice(login, settings, self.content, self.system, samples) for login in logins]
        self.by_id = {d.device_id: d for d in self.devices}
        self.touched: dict[int, SimDevice] = {}
        self.wakes: dict[int, float] = {}
        self.stopping = False
        self.stopped = False
        self._rng = random.Random(index)
        self._connect_rate = connect_rate
        self.process = psutil.Process()

    def system(self) -> fleet_pb2.SystemStats:
        now = time.monotonic()
        if now - self._sampled_at >= SYSTEM_SAMPLE_S:
            self._sample, self._sampled_at = self._sampler.sample(), now
        return self._sample

    def boot(self) -> None:
        for device in self.devices:
            device.updater.boot()
            device.link.start(own_thread=False)
            self.driver.add(
                device.link.client,
                lambda d=device: self.touch(d),
                lambda d=device: self._lost(d),
            )
        self.driver.watch(self.conn, self._command)

    def start(self) -> None:
        """Connect every device, paced so the broker's listen queue never overflows into SYN
        retries; each starts its telemetry windows as it first connects, as a device that boots
        and reaches its broker within the second, at a random point of the period."""
        now = time.monotonic()
        interval = self.settings.telemetry_interval_s
        for i, device in enumerate(self.devices):
            at = now + i / self._connect_rate
            self.driver.at(at, lambda d=device: self._attempt(d))
            first = at + self._rng.uniform(0, interval)
            self.driver.at(first, lambda d=device, t=first: self._window(d, t))

    def touch(self, device: SimDevice) -> None:
        self.touched[id(device)] = device

    def _attempt(self, device: SimDevice) -> None:
        if device.link.connected or device.link.stopping or self.stopping:
            return
        if not device.link.attempt():
            self.driver.at(time.monotonic() + device.link.retry_delay, lambda: self._attempt(device))

    def _lost(self, device: SimDevice) -> None:
        self.touch(device)
        if not device.link.stopping and not self.stopping:
            self.driver.at(time.monotonic() + device.link.retry_delay, lambda: self._attempt(device))

    def _window(self, device: SimDevice, due: float) -> None:
        if self.stopping:
            return
        device.close_window()
        self.touch(device)
        following = due + self.settings.telemetry_interval_s
        self.driver.at(following, lambda: self._window(device, following))

    def _step_touched(self) -> None:
        now = time.monotonic()
        touched, self.touched = self.touched, {}
        for key, device in touched.items():
            wake = device.step(now)
            if wake < self.wakes.get(key, float("inf")) or self.wakes.get(key, 0.0) <= now:
                self.wakes[key] = wake
                if wake != float("inf"):
                    self.driver.at(max(wake, now), lambda d=device: self.touch(d))

    def run(self) -> None:
        self.boot()
        self.conn.send(("ready", self.stats()))
        while not self.stopped:
            self.driver.run_once()
            self._step_touched()

    def stats(self) -> WorkerStats:
        cpu = self.process.cpu_times()
        return WorkerStats(
            devices=len(self.devices),
            connected=sum(d.link.connected for d in self.devices),
            windows=sum(d.windows for d in self.devices),
            acknowledged=sum(d.outbox.acknowledged for d in self.devices),
            active=Counter(d.active_digest() for d in self.devices),
            failed=Counter(digest for d in self.devices for digest in d.failed_digests()),
            chunk_bytes=sum(d.artifacts.bytes_received for d in self.devices),
            cpu_s=cpu.user + cpu.system,
        )

    def _command(self) -> None:
        command = self.conn.recv()
        if command[0] == "stats":
            self.conn.send(self.stats())
        elif command[0] == "start":
            self.start()
            self.conn.send(True)
        elif command[0] == "offline":
            self._disconnect(self._named(command[1]))
            self.conn.send(True)
        elif command[0] == "online":
            for device in self._named(command[1]):
                device.link.start(own_thread=False)
                self._attempt(device)
            self.conn.send(True)
        elif command[0] == "hold":
            for device in self.devices:
                device.held = bool(command[1])
                self.touch(device)
            self.conn.send(True)
        elif command[0] == "stop":
            self._stop()
            self.conn.send(self.stats())
            self.stopped = True
        else:
            self.conn.send(ValueError(f"unknown command {command!r}"))

    def _named(self, device_ids: list[str]) -> list[SimDevice]:
        return [self.by_id[d] for d in device_ids if d in self.by_id]

    def _disconnect(self, devices: list[SimDevice]) -> None:
        """Stop these devices' links as the agent does: the offline status acknowledged (a clean
        disconnect sends no will), then the disconnect; the network loop runs meanwhile."""
        said = [d.link.say_offline() for d in devices if d.link.connected]
        deadline = time.monotonic() + STOP_FLUSH_S
        while time.monotonic() < deadline and not all(p.done for p in said):
            self.driver.run_once(0.05)
        for device in devices:
            device.link.stop(timeout=0)
        peers = {id(d.link.client) for d in devices}
        while time.monotonic() < deadline and any(
            p.sock is not None for p in self.driver.peers if id(p.client) in peers
        ):
            self.driver.run_once(0.05)

    def _stop(self) -> None:
        self.stopping = True
        self._disconnect(self.devices)
        for device in self.devices:
            device.outbox.close()


def main(
    conn: Connection,
    logins: list[DeviceLogin],
    settings: SimSettings,
    index: int,
    connect_rate: float,
    log_file: Path,
    nice: int = 0,
) -> None:
    raise_open_files_limit()
    # Simulated devices stand for hardware elsewhere: niced, they take what the measured side leaves.
    os.nice(nice)
    logging.basicConfig(
        filename=log_file, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # One line per device at start says the link is plain TCP: a test broker on this machine.
    logging.getLogger("agent.link").setLevel(logging.ERROR)
    try:
        Worker(conn, logins, settings, index, connect_rate).run()
    except Exception as exc:
        logging.exception("simulator process failed")
        conn.send(("failed", repr(exc)))
        raise
