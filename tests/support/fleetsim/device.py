"""One simulated device: the agent's own session (link, outbox, updater) on its own broker login.

Everything a device says and does on the wire is the agent's code: the
:class:`agent.link.Link` (topics, subscriptions, status and last will, payload
decoding, PUBACK checks), the :class:`agent.updater.Updater` and its planner
(signed desired states, windowed chunk requests, verification, staging with a
smoke inference, probation, reports), the SQLite outbox and its sender (telemetry
kept until the controller acknowledges it, sent again otherwise) and what
:class:`agent.session.Session` does with each inbound message. What differs is
outside the protocol: the network loop (one per process for all its devices,
:mod:`tests.support.fleetsim.driver`), artifact bytes and loaded models shared by the
devices of a process (:mod:`tests.support.fleetsim.storage`), and a system sample taken
once per process rather than per device.
"""

from __future__ import annotations

import queue
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet_proto import fleet_pb2

from agent import __version__
from agent.conditions import Conditions
from agent.config import MqttConfig, OutboxConfig, TransferConfig, UpdatesConfig
from agent.link import Link
from agent.outbox import Outbox, OutboxSender
from agent.samples import staging_inputs
from agent.session import Session
from agent.signing import KeyRing, parse_public_key
from agent.state import StateStore
from agent.telemetry import Inference, InferenceStats, Origin
from agent.updater import Updater
from tests.support.fleetsim.storage import SharedContent, SharedModels, SimArtifacts


@dataclass(frozen=True)
class DeviceLogin:
    device_id: str
    password: str


@dataclass(frozen=True)
class SimSettings:
    """What every simulated device of a fleet shares (sent to each simulator process)."""

    host: str
    port: int
    # Hex of the controller's Ed25519 public key, as a device is provisioned with; "" runs unverified.
    controller_key: str
    # Per-device state (state.json, outbox.db): a memory-backed folder such as /dev/shm for big fleets.
    state_dir: Path
    telemetry_interval_s: float = 10.0
    # Real inferences of the serving model each device runs per window (0: none, telemetry
    # then carries system statistics only), on rows drawn at random from ``samples`` (an .npy
    # of inputs for the model's first input, one row each), else on inputs made like the
    # staging smoke test's.
    inferences_per_window: int = 0
    samples: Path | None = None
    protocol: str = "v5"


class CountingOutbox(Outbox):
    """The agent's outbox, counting the telemetry windows the controller acknowledged."""

    acknowledged = 0

    def acknowledge(self, seqs: Iterable[int]) -> list[int]:
        ids = super().acknowledge(seqs)
        self.acknowledged += len(ids)
        return ids


class SimDevice(Session):
    def __init__(
        self,
        login: DeviceLogin,
        settings: SimSettings,
        content: SharedContent,
        system: Callable[[], fleet_pb2.SystemStats],
        samples: np.ndarray | None = None,
    ) -> None:
        self.device_id = login.device_id
        self.samples = samples
        self._rng = np.random.default_rng(zlib.crc32(login.device_id.encode()))
        self.settings = settings
        data = settings.state_dir / login.device_id
        data.mkdir(parents=True, exist_ok=True)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.conditions = Conditions()
        outbox = OutboxConfig()
        # No reserve file: ten thousand of them would be 10 GB of the machine's memory.
        self.outbox = CountingOutbox(data / "outbox.db", outbox.max_records, self.conditions, reserve_bytes=0)
        mqtt = MqttConfig(
            host=settings.host,
            port=settings.port,
            username=login.device_id,
            password=login.password,
            protocol=settings.protocol,
        )
        self.link = Link(login.device_id, mqtt, self.inbox, __version__)
        self.sender = OutboxSender(self.outbox, self._publish_record, ack_timeout_s=outbox.ack_timeout_s)
        self.stats = InferenceStats()
        self.artifacts = SimArtifacts(content)
        self.pool = SharedModels(content)
        key = settings.controller_key
        transfer, updates = TransferConfig(), UpdatesConfig()
        self.updater = Updater(
            login.device_id,
            StateStore(data / "state.json"),
            self.artifacts,
            self.pool,
            self.link,
            self.emit,
            __version__,
            window=transfer.window,
            request_timeout_s=transfer.request_timeout_s,
            keys=KeyRing(data, parse_public_key(key) if key else None),
            probe=self.stats.totals,
            conditions=self.conditions,
            max_attempts=updates.max_attempts,
        )
        self.window_began = time.monotonic()
        self._system = system
        # Telemetry held in the outbox (not sent) while set: a backlog released at once.
        self.held = False
        self.windows = 0
        # When the planner next has something to do without an inbound message.
        self.due = 0.0

    def step(self, now: float) -> float:
        """One round of the agent's service loop: inbound messages, the plan, the outbox.
        Returns when the device must be looked at again without an inbound message."""
        handled = False
        while True:
            try:
                event = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(event)
            handled = True
        if handled or now >= self.due:
            self.due = self.updater.converge()
        self.sender.pump(self.link.connected and not self.held)
        wake = self.due
        if self.sender.awaiting:
            wake = min(wake, min(self.sender.awaiting.values()) + self.sender.ack_timeout_s)
        if self.sender.paused_until > now:
            wake = min(wake, self.sender.paused_until)
        return wake

    def _telemetry(self, window_start: int, window_end: int) -> None:
        for _ in range(self.settings.inferences_per_window):
            self._infer()
        self.queue_telemetry(window_start, window_end, self._system(), self.stats.drain())
        self.windows += 1

    def close_window(self) -> None:
        self._close_window()

    def _infer(self) -> None:
        for serving in self.pool.all():
            if self.samples is not None:
                row = self.samples[self._rng.integers(len(self.samples))][None, :]
                inputs = {serving.model.inputs[0].name: row}
            else:
                inputs = staging_inputs(serving.model.inputs, serving.signature, None)
            start = time.perf_counter()
            try:
                serving.model.run(inputs)
                ok = True
            except Exception:
                ok = False
            latency = (time.perf_counter() - start) * 1000
            self.stats.record(
                Inference(
                    serving.tenant, serving.model_name, serving.model_version, Origin.PIPELINE, latency, ok
                )
            )

    def active_digest(self, tenant: str = "default") -> str:
        ts = self.updater.state.tenants.get(tenant)
        return ts.active.assignment.digest if ts is not None and ts.active is not None else ""

    def failed_digests(self) -> list[str]:
        return list(self.updater.state.failures)
