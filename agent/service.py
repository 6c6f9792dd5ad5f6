"""The agent process: wires the parts together and runs the main loop.

Start order matters: the models on disk are loaded and the gRPC socket serves
before the broker is contacted, so inference never waits for the network. One
loop thread owns the state, the outbox and the artifact store; paho's thread
only decodes and queues, gRPC threads only read the model pool and record stats;
tenant pipelines (:mod:`agent.pipeline`) read their sources and run on the
scheduler's workers. Under systemd (Type=notify) the agent sends READY once
the socket serves, pings the watchdog from this loop (so a stuck loop gets the
agent restarted) and keeps a STATUS line. SIGTERM/SIGINT stop the loop;
shutdown sends STOPPING, stops the sources, finishes queued and in-flight
inference, stops gRPC, queues the last (partial) telemetry window with its
drift sketches, flushes the outbox for a bounded time and disconnects cleanly
after publishing the offline status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind
from google.protobuf.message import DecodeError

from agent import __version__
from agent.accelerators import Accelerator
from agent.artifacts import ArtifactStore
from agent.atomic import write_atomic
from agent.conditions import Conditions
from agent.config import AgentConfig
from agent.errors import TenantError
from agent.link import Inbound, Link, now_ms
from agent.observe import Observer
from agent.outbox import Outbox, OutboxSender
from agent.pipeline import Pipelines, ResultHub
from agent.pool import MB, ModelPool
from agent.runtime import probe_accelerator
from agent.session import Session
from agent.signing import KeyRing, parse_public_key
from agent.state import StateStore
from agent.systemd import Notifier
from agent.telemetry import Inferences, InferenceStats, PipelineStats, SystemSampler
from agent.tenants import TenantSpec, from_proto, merge
from agent.updater import Updater

if TYPE_CHECKING:
    import grpc

    from agent.local_calls import LocalInference, TenantAccess
    from agent.shared_memory import SharedMemoryServer

log = logging.getLogger(__name__)

# The loop wakes at least this often (signal flags, outbox acknowledgements).
TICK_S = 0.2
FLUSH_ON_STOP_S = 3.0
# Queued and in-flight inference gets this long to finish at SIGTERM.
DRAIN_ON_STOP_S = 3.0
# The tenants the controller declared last (a DesiredState holding only them).
TENANTS_FILE = "tenants.pb"


class Service(Session):
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.stopping = threading.Event()
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.inbox: queue.Queue[Any] = queue.Queue()
        # Reported with the device's state while they hold (a full disk, ...).
        self.conditions = Conditions()
        self.outbox = Outbox(data / "outbox.db", config.outbox.max_records, self.conditions)
        workers, threads = config.scheduler.resolved(os.cpu_count() or 1)
        self.accelerator = Accelerator(
            config.accelerator.runtime, self.conditions, data, config.accelerator.delegate_library
        )
        self.pool = ModelPool(
            budget_bytes=int(config.pool.memory_budget_mb * MB),
            idle_unload_s=config.pool.idle_unload_s,
            threads=threads,
            accelerator=self.accelerator,
        )
        self.stats = InferenceStats()
        self.pipeline_stats = PipelineStats()
        # Every inference, whatever fed it (pipeline, gRPC, shadow lane), counts here once.
        self.inferences = Inferences(self.stats, self.pipeline_stats)
        self.hub = ResultHub()
        self.observer = Observer(config.device_id)
        self.pipelines = Pipelines(
            config.device_id,
            self.pool,
            workers,
            self.pipeline_stats,
            self.emit,
            self._publish_result,
            self.hub,
            self.observer,
            # What a job costs is the CPU it used. With one intra-op thread the runtime
            # computes in the worker's own thread, so that thread's CPU clock measures it
            # exactly, unmoved by other processes taking the core or by GIL waits; with
            # more, the runtime's own threads do part of the work and wall time is closer.
            cost_clock=time.thread_time if threads == 1 else time.perf_counter,
            inferences=self.inferences,
        )
        self.declared: tuple[TenantSpec, ...] = ()
        self.declared_generation = -1
        self.notifier = Notifier()
        self.sampler = SystemSampler(data)
        self.link = Link(config.device_id, config.mqtt, self.inbox, __version__)
        self.sender = OutboxSender(
            self.outbox, self._publish_record, ack_timeout_s=config.outbox.ack_timeout_s
        )
        self.updater = Updater(
            config.device_id,
            StateStore(data / "state.json"),
            ArtifactStore(data, reserve_bytes=int(config.updates.reserve_mb * MB)),
            self.pool,
            self.link,
            self.emit,
            __version__,
            window=config.transfer.window,
            request_timeout_s=config.transfer.request_timeout_s,
            keys=_keys(config),
            probe=self.stats.totals,
            conditions=self.conditions,
            max_attempts=config.updates.max_attempts,
        )
        self.server: grpc.Server | None = None
        # The shared-memory fast path beside the gRPC socket (agent.shared_memory).
        self.fast_path: SharedMemoryServer | None = None
        # Start of the telemetry window in progress, on the monotonic clock: a window lasts
        # what that clock says, so a jump of the device's clock never stretches or inverts one.
        self.window_began = time.monotonic()

    def _publish_result(self, topic: str, payload: bytes) -> None:
        # Results are live: while the broker is away they are not queued.
        if self.link.connected:
            self.link.publish(topic, payload)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Said before any model loads, so a device with nothing to serve yet reports it too.
        probe_accelerator(self.accelerator)
        self.updater.boot()
        self.pipelines.start()
        self._load_declared()
        self.pipelines.apply(merge(self.config.tenants, self.declared))
        # The socket appears only now: an app that connects the moment it does (waiting on the
        # socket file) finds its tenant known, not "no pipeline on this device".
        if self.config.api.enabled:
            self.server = self._serve_api()
        served = ", ".join(f"{s.tenant}:{s.model_name}:{s.model_version}" for s in self.pool.all()) or "-"
        log.info(
            "agent ready device=%s socket=%s models=%s tenants=%s",
            self.config.device_id,
            self.config.socket if self.server is not None else "- (local API off)",
            served,
            ",".join(sorted(self.pipelines.specs())) or "-",
        )
        self.notifier.ready(self._status_line())
        self.link.start()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _serve_api(self) -> grpc.Server:
        # Imported here: an agent with the local API off never loads gRPC.
        from agent.api import InferenceApi, ResultsApi, TenantAuth, serve

        auth = TenantAuth(self.pipelines.specs, self.config.api.require_token)
        api = InferenceApi(
            self.pool,
            self.inferences,
            lambda: self.link.connected,
            auth,
            self.pipelines.call,
            self.observer,
            shadow=self.pipelines.offer_shadow,
        )
        results = ResultsApi(self.hub, self.pipelines.specs, auth)
        server = serve(
            self.config.socket,
            api,
            results=results,
            socket_mode=self.config.api.socket_mode,
            socket_group=self.config.api.socket_group,
        )
        self._serve_fast_path(api.calls, auth.access)
        return server

    def _serve_fast_path(self, calls: LocalInference, access: TenantAccess) -> None:
        from agent.shared_memory import SharedMemoryServer
        from agent.shm_wire import fast_path_socket

        fast_path = SharedMemoryServer(fast_path_socket(self.config.socket), calls, access)
        try:
            fast_path.start(self.config.api.socket_mode, self.config.api.socket_group)
        except OSError as exc:
            # gRPC still serves every call; only the fast path is missing (a path too long, ...).
            log.warning(
                "shared-memory fast path off device=%s socket=%s error=%s",
                self.config.device_id,
                fast_path.path,
                exc,
            )
            return
        self.fast_path = fast_path

    def _loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_telemetry = time.monotonic() + interval
        self.window_began = time.monotonic()
        watchdog = self.notifier.watchdog_interval_s
        next_ping = time.monotonic()
        while not self.stopping.is_set():
            deadline = self.updater.converge()
            self._queue_captures()
            self.sender.pump(self.link.connected)
            now = time.monotonic()
            if watchdog is not None and now >= next_ping:
                # Pinged from this loop only: a loop stuck anywhere above stops the pings.
                self.notifier.watchdog()
                next_ping = now + watchdog
            if now >= next_telemetry:
                self._close_window()
                next_telemetry = max(next_telemetry + interval, now)
                self.pool.sweep()
                self.notifier.status(self._status_line())
                continue
            # While records await their PUBACK, look again soon to free the window.
            tick = 0.01 if self.sender.busy else TICK_S
            wake = min(deadline, next_telemetry, now + tick)
            if watchdog is not None:
                wake = min(wake, next_ping)
            timeout = max(0.0, wake - now)
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

    def _desired_taken(self, msg: fleet_pb2.DesiredState) -> None:
        self.observer.configure(msg)
        self._declare_tenants(msg)

    def _declare_tenants(self, msg: fleet_pb2.DesiredState) -> None:
        """Run the tenants the controller declares beside those of the config (newest generation wins)."""
        if int(msg.generation) <= self.declared_generation:
            return
        try:
            declared = tuple(from_proto(t) for t in msg.tenants)
        except TenantError as exc:
            self._payload_rejected(Kind.DESIRED.value, f"tenant spec refused: {exc}")
            return
        if len({t.id for t in declared}) != len(declared):
            self._payload_rejected(Kind.DESIRED.value, "desired state declares a tenant twice")
            return
        self.declared_generation = int(msg.generation)
        if declared == self.declared:
            return
        # Persisted before they run, so a restart without the broker runs them too.
        record = fleet_pb2.DesiredState(generation=msg.generation, tenants=msg.tenants)
        try:
            write_atomic(self.config.data_dir / TENANTS_FILE, encode(record))
        except OSError as exc:
            log.error("cannot persist declared tenants device=%s error=%s", self.config.device_id, exc)
        self.declared = declared
        self.pipelines.apply(merge(self.config.tenants, declared))

    def _load_declared(self) -> None:
        path = self.config.data_dir / TENANTS_FILE
        try:
            record = fleet_pb2.DesiredState.FromString(path.read_bytes())
            declared = tuple(from_proto(t) for t in record.tenants)
        except FileNotFoundError:
            return
        except (OSError, DecodeError, TenantError) as exc:
            # The controller declares them again with its next desired state.
            log.error(
                "declared tenants unreadable device=%s path=%s error=%s", self.config.device_id, path, exc
            )
            return
        self.declared, self.declared_generation = declared, int(record.generation)

    def _status_line(self) -> str:
        return (
            f"serving {len(self.pool.all())} model(s), {len(self.pipelines.specs())} tenant pipeline(s), "
            f"broker {'connected' if self.link.connected else 'disconnected'}, "
            f"{self.pool.loaded_bytes() / MB:.1f} MB of models loaded"
        )

    def _telemetry(self, window_start: int, window_end: int) -> None:
        self.queue_telemetry(
            window_start,
            window_end,
            self.sampler.sample(),
            self.stats.drain(),
            *self.pipeline_stats.drain(*self.pipelines.telemetry_inputs()),
            drift=self.observer.drain_sketches(),
        )

    def _queue_captures(self, final: bool = False) -> None:
        """Finished capture uploads go to the outbox, like telemetry: sent when the broker is there."""
        for chunks in self.observer.uploads(final):
            first = chunks[0]
            at = now_ms()
            for chunk in chunks:
                self.outbox.append(Kind.CAPTURE.value, encode(chunk), at)
            log.info(
                "capture upload queued device=%s tenant=%s model=%s version=%s samples=%d bytes=%d chunks=%d",
                self.config.device_id,
                first.tenant,
                first.model_name,
                first.model_version,
                first.samples,
                first.size,
                len(chunks),
            )

    def _shutdown(self) -> None:
        log.info("agent stopping device=%s", self.config.device_id)
        self.notifier.stopping()
        # Calls in flight finish on the scheduler's workers, so gRPC stops first.
        if self.server is not None:
            self.server.stop(grace=1.0).wait(2.0)
            # gRPC removes the path it bound, which the socket was moved from (agent.api.serve).
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        if self.fast_path is not None:
            self.fast_path.stop(2.0)
        if not self.pipelines.stop(DRAIN_ON_STOP_S):
            log.warning("inference still running at stop device=%s", self.config.device_id)
        # What was captured but not yet uploaded waits in the outbox for the next start.
        self._queue_captures(final=True)
        # So does the window in progress, with its drift sketches: inference has stopped, so
        # nothing more lands in it, and without it the last seconds served would be lost.
        self._close_window()
        deadline = time.monotonic() + FLUSH_ON_STOP_S
        while self.link.connected and time.monotonic() < deadline:
            self.sender.pump(True)
            if not self.sender.busy and len(self.outbox) == 0:
                break
            self._take_acknowledgements(0.02)
        self.link.stop()
        self.outbox.close()
        self.notifier.close()
        log.info("agent stopped device=%s", self.config.device_id)

    def _take_acknowledgements(self, timeout: float) -> None:
        """While stopping, the inbox is read for the controller's telemetry acknowledgements only:
        a window it acknowledges leaves the outbox now rather than being sent again at the next start."""
        try:
            event = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        if isinstance(event, Inbound) and isinstance(event.message, fleet_pb2.TelemetryAck):
            self.sender.acknowledge(event.message.seqs)


def _keys(config: AgentConfig) -> KeyRing:
    """The pinned controller key that signs assignments; without one, models are not verified."""
    key = config.security.controller_public_key
    ring = KeyRing(config.data_dir, parse_public_key(key) if key else None)
    if ring.enabled:
        log.info("controller key pinned device=%s key=%s", config.device_id, ring.key_id)
    else:
        log.warning(
            "no controller key pinned: desired states and models are accepted unsigned device=%s "
            "(set [security] controller_public_key)",
            config.device_id,
        )
    return ring
