"""The agent process: wires the parts together and runs the main loop.

Start order matters: the models on disk are loaded and the gRPC socket serves
before the broker is contacted, so inference never waits for the network. One
loop thread owns the state, the outbox and the artifact store; paho's thread
only decodes and queues, gRPC threads only read the model pool and record stats.
SIGTERM/SIGINT stop the loop; shutdown stops gRPC, flushes the outbox for a
bounded time and disconnects cleanly after publishing the offline status.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from types import FrameType
from typing import Any

import grpc
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind

from agent import __version__
from agent.api import InferenceApi, serve
from agent.artifacts import ArtifactStore
from agent.config import AgentConfig
from agent.link import Inbound, Link, LinkDown, LinkUp, Publication, Rejected, now_ms
from agent.outbox import Outbox, OutboxSender
from agent.pool import ModelPool
from agent.state import StateStore
from agent.telemetry import InferenceStats, SystemSampler, build_telemetry
from agent.updater import Updater

log = logging.getLogger(__name__)

# The loop wakes at least this often (signal flags, outbox acknowledgements).
TICK_S = 0.2
FLUSH_ON_STOP_S = 3.0


class Service:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = threading.Event()
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.outbox = Outbox(data / "outbox.db", config.outbox.max_records)
        self.pool = ModelPool()
        self.stats = InferenceStats()
        self.sampler = SystemSampler(data)
        self.link = Link(config.device_id, config.mqtt, self.inbox, __version__)
        self.sender = OutboxSender(self.outbox, self._publish_record)
        self.updater = Updater(
            config.device_id,
            StateStore(data / "state.json"),
            ArtifactStore(data),
            self.pool,
            self.link,
            self.emit,
            __version__,
            window=config.transfer.window,
            request_timeout_s=config.transfer.request_timeout_s,
        )
        self.server: grpc.Server | None = None

    def _publish_record(self, kind: str, payload: bytes) -> Publication:
        return self.link.publish(self.link.topic(Kind(kind)), payload)

    def emit(self, kind: str, severity: str, message: str, attributes: dict[str, str]) -> None:
        event = fleet_pb2.Event(
            device_id=self.config.device_id,
            at_ms=now_ms(),
            kind=kind,
            severity=severity,
            message=message,
            attributes=attributes,
        )
        self.outbox.append(Kind.EVENTS.value, encode(event), event.at_ms)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.updater.boot()
        api = InferenceApi(self.pool, self.stats, lambda: self.link.connected)
        self.server = serve(self.config.socket, api)
        served = ", ".join(f"{s.tenant}:{s.model_name}:{s.model_version}" for s in self.pool.all()) or "-"
        log.info(
            "agent ready device=%s socket=%s models=%s", self.config.device_id, self.config.socket, served
        )
        self.link.start()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_telemetry = time.monotonic() + interval
        window_start = now_ms()
        while not self.stopping.is_set():
            deadline = self.updater.converge()
            self.sender.pump(self.link.connected)
            now = time.monotonic()
            if now >= next_telemetry:
                window_end = now_ms()
                self._telemetry(window_start, window_end)
                window_start = window_end
                next_telemetry = max(next_telemetry + interval, now)
                continue
            # While records await their PUBACK, look again soon to free the window.
            tick = 0.01 if self.sender.busy else TICK_S
            timeout = max(0.0, min(deadline, next_telemetry, now + tick) - now)
            try:
                event = self.inbox.get(timeout=timeout)
            except queue.Empty:
                continue
            self._handle(event)
            while True:
                try:
                    self._handle(self.inbox.get_nowait())
                except queue.Empty:
                    break

    def _handle(self, event: Any) -> None:
        try:
            self._dispatch(event)
        except Exception:
            # No message may kill the agent (a retained one would do it again at
            # every start): what failed is logged with its traceback, the loop goes on.
            log.exception(
                "inbound message failed device=%s event=%s", self.config.device_id, type(event).__name__
            )

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Inbound):
            if isinstance(event.message, fleet_pb2.DesiredState):
                refused = self.updater.on_desired(event.message)
                if refused:
                    self._payload_rejected(Kind.DESIRED.value, refused)
            elif isinstance(event.message, artifact_pb2.ArtifactResponse):
                self.updater.on_artifact(event.message)
        elif isinstance(event, Rejected):
            self._payload_rejected(event.topic, event.reason)
        elif isinstance(event, LinkUp):
            self.updater.on_link_up()
        elif isinstance(event, LinkDown):
            log.info("working offline device=%s reason=%s", self.config.device_id, event.reason)

    def _payload_rejected(self, topic: str, reason: str) -> None:
        log.warning("payload rejected device=%s topic=%s error=%s", self.config.device_id, topic, reason)
        self.emit("payload_rejected", "warning", reason, {"topic": topic})

    def _telemetry(self, window_start: int, window_end: int) -> None:
        telemetry = build_telemetry(
            self.config.device_id,
            self.outbox.next_seq(),
            window_start,
            window_end,
            self.sampler.sample(),
            self.stats.drain(),
            self.outbox.dropped(),
        )
        dropped = self.outbox.append(Kind.TELEMETRY.value, encode(telemetry), window_end)
        if dropped:
            log.warning("outbox full device=%s dropped=%d", self.config.device_id, dropped)

    def _shutdown(self) -> None:
        log.info("agent stopping device=%s", self.config.device_id)
        if self.server is not None:
            self.server.stop(grace=1.0).wait(2.0)
        deadline = time.monotonic() + FLUSH_ON_STOP_S
        while self.link.connected and time.monotonic() < deadline:
            self.sender.pump(True)
            if not self.sender.busy and len(self.outbox) == 0:
                break
            time.sleep(0.02)
        self.link.stop()
        self.outbox.close()
        log.info("agent stopped device=%s", self.config.device_id)
