"""Many simulated devices in one process: real MQTT clients that speak the agent's protocol.

Each :class:`SimDevice` is a paho client logged in with its own broker
credentials. It takes the retained desired state, takes the artifact from its wave
broadcast when the assignment names one (the agent's :mod:`agent.broadcast` opens the
sealed manifest and chunks; it says it listens, and asks for what the broadcast did not
bring once it is done or quiet), else fetches it through a
window of chunks, asking in batches with the agent's own rule
(:func:`agent.reconciler.chunk_requests`), checks every chunk and the whole file,
loads it in onnxruntime (one session per artifact per process), answers a smoke
inference, reports its state, and, when given samples, runs inferences and
publishes telemetry windows with real counts, errors and latency percentiles.
It keeps the previous model, so a rollback to it needs no download.

Used by the e2e rollout tests (beside real agent processes) and by
bench/rollout_fleet.py, where hundreds of them run in a few processes. There the
devices of a process share a :class:`Checked`: a chunk byte for byte equal to one
another device of the process already opened and checked is not decrypted and
hashed again, nor a whole artifact made of such chunks (anything else is checked in
full). On a real fleet each device checks on its own CPU; two cores checking for
200 devices would measure the simulation, not the controller and the broker.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import decode, decode_as, encode
from edgefleet_proto.topics import Kind, Topic
from edgefleet_proto.wave import is_wave_topic
from paho.mqtt.enums import CallbackAPIVersion

from agent.broadcast import Reception, open_chunk, open_manifest, reception
from agent.errors import SealRejected
from agent.reconciler import chunk_requests
from agent.state import Assignment

WINDOW = 8
CHUNK_TIMEOUT_S = 3.0


class Sessions:
    """One onnxruntime session per artifact digest, shared by the devices of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, ort.InferenceSession] = {}

    def get(self, digest: str, data: bytes) -> ort.InferenceSession:
        with self._lock:
            if digest not in self._sessions:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                self._sessions[digest] = ort.InferenceSession(
                    data, options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[digest]


class Checked:
    """Chunks and artifacts the devices of one process have opened and checked already."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (digest, index) -> (what arrived: sealed bytes or plain data, its plain bytes)
        self._chunks: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self._wholes: set[str] = set()

    def chunk(
        self, digest: str, index: int, arrived: bytes, check: Callable[[], bytes | None]
    ) -> bytes | None:
        """The plain bytes of chunk ``index`` that arrived as ``arrived``: from the cache when the
        same bytes were checked before, else from ``check`` (None: refused)."""
        with self._lock:
            seen = self._chunks.get((digest, index))
        if seen is not None and seen[0] == arrived:
            return seen[1]
        plain = check()
        if plain is not None:
            with self._lock:
                self._chunks[(digest, index)] = (arrived, plain)
        return plain

    def whole(self, digest: str, data: bytes) -> bool:
        with self._lock:
            if digest in self._wholes:
                return True
        if hashlib.sha256(data).hexdigest() != digest:
            return False
        with self._lock:
            self._wholes.add(digest)
        return True


@dataclass
class _Transfer:
    assignment: fleet_pb2.ModelAssignment
    manifest: artifact_pb2.ArtifactManifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    outstanding: dict[int, float] = field(default_factory=dict)
    asked_at: float = 0.0
    # Its wave broadcast: where, last heard from (monotonic), over, and whether we said we listen.
    reception: Reception | None = None
    heard_at: float = 0.0
    broadcast_done: bool = False
    told: bool = False


@dataclass
class _Window:
    count: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class SimDevice:
    def __init__(
        self,
        device_id: str,
        password: str,
        port: int,
        sessions: Sessions | None = None,
        samples: np.ndarray | None = None,
        input_name: str = "X",
        keep_models: bool = True,
        checked: Checked | None = None,
    ) -> None:
        self.device_id = device_id
        self.checked = checked
        self.sessions = sessions
        self.samples = samples
        self.input_name = input_name
        self.keep_models = keep_models
        self.lock = threading.RLock()
        self.desired_generation = 0
        self.applied_generation = 0
        self.want: fleet_pb2.ModelAssignment | None = None
        self.active: fleet_pb2.ModelAssignment | None = None
        self.store: dict[str, bytes] = {}
        self.failed: dict[str, str] = {}
        self.transfer: _Transfer | None = None
        self.window = _Window()
        self.window_start_ms = int(time.time() * 1000)
        self.seq = 0
        self.bytes_received = 0
        self.activated_at: dict[str, float] = {}
        self._last_report: bytes = b""
        self._rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2)
        self.client.max_inflight_messages_set(64)
        will = fleet_pb2.DeviceStatus(online=False, at_ms=int(time.time() * 1000), agent_version="sim")
        self.client.will_set(self.topic(Kind.STATUS), encode(will), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.port = port
        self.connected = threading.Event()

    def topic(self, kind: Kind) -> str:
        return str(Topic(self.device_id, kind))

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> SimDevice:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Go offline cleanly (offline status first: a clean disconnect sends no will)."""
        if self.client.is_connected():
            status = fleet_pb2.DeviceStatus(online=False, at_ms=int(time.time() * 1000), agent_version="sim")
            info = self.client.publish(self.topic(Kind.STATUS), encode(status), qos=1, retain=True)
            with suppress(RuntimeError, ValueError):  # the broker went away meanwhile: the will says it
                info.wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        topics = [(self.topic(Kind.DESIRED), 1), (self.topic(Kind.ARTIFACT_RESPONSE), 1)]
        with self.lock:
            t = self.transfer
            if t is not None and t.reception is not None:
                topics.append((t.reception.topic, 1))
                t.told = False
        client.subscribe(topics)
        status = fleet_pb2.DeviceStatus(online=True, at_ms=int(time.time() * 1000), agent_version="sim")
        client.publish(self.topic(Kind.STATUS), encode(status), qos=1, retain=True)
        with self.lock:
            self._last_report = b""
            if self.transfer is not None:
                self.transfer.outstanding.clear()
                self.transfer.asked_at = 0.0
        self.connected.set()
        self.report()

    # -- inbound ----------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if is_wave_topic(msg.topic):
                if msg.payload:
                    frame = decode_as(artifact_pb2.WaveFrame, bytes(msg.payload))
                    with self.lock:
                        self._on_wave(msg.topic, frame)
                return
            kind = Topic.parse(msg.topic).kind
            message = decode(kind, bytes(msg.payload))
            with self.lock:
                if isinstance(message, fleet_pb2.DesiredState):
                    self._on_desired(message)
                elif isinstance(message, artifact_pb2.ArtifactResponse):
                    self._on_artifact(message)
        except Exception as exc:  # a simulated device must not die on a message either
            print(f"sim {self.device_id}: message dropped: {exc!r}")

    def _on_desired(self, msg: fleet_pb2.DesiredState) -> None:
        if msg.generation <= self.desired_generation:
            return
        self.desired_generation = msg.generation
        self.want = next((m for m in msg.models if (m.tenant or "default") == "default"), None)
        self._converge()

    def _converge(self) -> None:
        want = self.want
        if want is None or (self.active is not None and self.active == want):
            self.applied_generation = self.desired_generation
        elif want.artifact_digest in self.failed:
            pass
        elif want.artifact_digest in self.store:
            self._activate(want)
        elif self.transfer is None or self.transfer.assignment.artifact_digest != want.artifact_digest:
            self._drop_transfer()
            self.transfer = _Transfer(want, reception=reception(Assignment.from_proto(want)))
            if self.transfer.reception is not None:
                self.transfer.heard_at = time.monotonic()
                self.client.subscribe(self.transfer.reception.topic, qos=1)
            self._ask()
        self.report()

    def _drop_transfer(self) -> None:
        t, self.transfer = self.transfer, None
        if t is not None and t.reception is not None:
            self.client.unsubscribe(t.reception.topic)

    def _on_wave(self, topic: str, frame: artifact_pb2.WaveFrame) -> None:
        """A frame of the broadcast the transfer listens to: its announcement, or a sealed chunk."""
        t = self.transfer
        if t is None or t.reception is None or t.reception.topic != topic:
            return
        t.heard_at = time.monotonic()
        try:
            if frame.HasField("announcement"):
                if t.manifest is None:
                    t.manifest = open_manifest(t.reception.key, frame.digest, frame.announcement)
                if frame.announcement.done:
                    t.broadcast_done = True
                    self._ask()
                elif not t.told:
                    req = artifact_pb2.ChunkRequest(digest=frame.digest, listening=True)
                    self.client.publish(self.topic(Kind.ARTIFACT_REQUEST), encode(req), qos=1)
                    t.told = True
            elif frame.HasField("chunk") and t.manifest is not None:
                sealed = frame.chunk
                if sealed.index in t.chunks or sealed.index >= len(t.manifest.chunk_sha256):
                    return
                manifest, key = t.manifest, t.reception.key

                def check() -> bytes | None:
                    data = open_chunk(key, frame.digest, manifest.chunk_size, sealed)
                    return (
                        data if hashlib.sha256(data).digest() == manifest.chunk_sha256[sealed.index] else None
                    )

                plain = self._checked(frame.digest, sealed.index, sealed.sealed, check)
                if plain is not None:
                    t.chunks[sealed.index] = plain
                    self.bytes_received += len(plain)
                    self._complete(t)
        except SealRejected as exc:
            print(f"sim {self.device_id}: broadcast frame refused: {exc}")

    def _on_artifact(self, resp: artifact_pb2.ArtifactResponse) -> None:
        t = self.transfer
        body = resp.WhichOneof("body")
        if t is None:
            return
        if body == "manifest" and t.manifest is None and resp.manifest.digest == t.assignment.artifact_digest:
            t.manifest = resp.manifest
        elif body == "chunk" and t.manifest is not None and resp.chunk.digest == t.manifest.digest:
            c, manifest = resp.chunk, t.manifest
            t.outstanding.pop(c.index, None)

            def check() -> bytes | None:
                return (
                    bytes(c.data)
                    if hashlib.sha256(c.data).digest() == manifest.chunk_sha256[c.index]
                    else None
                )

            plain = (
                self._checked(c.digest, c.index, c.data, check)
                if c.index < len(manifest.chunk_sha256)
                else None
            )
            if plain is not None:
                t.chunks[c.index] = plain
                self.bytes_received += len(plain)
        elif body == "error":
            self.failed[t.assignment.artifact_digest] = resp.error.reason
            self._drop_transfer()
            self.report()
            return
        if not self._complete(t):
            self._ask()

    def _complete(self, t: _Transfer) -> bool:
        """Verify and keep the artifact once every chunk is in; False while some are missing."""
        if t.manifest is None or len(t.chunks) != len(t.manifest.chunk_sha256):
            return False
        data = b"".join(t.chunks[i] for i in range(len(t.chunks)))
        self._drop_transfer()
        whole = self.checked.whole if self.checked is not None else _sha256_is
        if not whole(t.manifest.digest, data):
            self.failed[t.manifest.digest] = "digest mismatch"
        else:
            self.store[t.manifest.digest] = data
        self._converge()
        return True

    def _checked(
        self, digest: str, index: int, arrived: bytes, check: Callable[[], bytes | None]
    ) -> bytes | None:
        return check() if self.checked is None else self.checked.chunk(digest, index, arrived, check)

    def _ask(self, now: float | None = None) -> None:
        t = self.transfer
        if t is None or not self.connected.is_set():
            return
        now = time.monotonic() if now is None else now
        digest = t.assignment.artifact_digest
        if t.reception is not None and not t.broadcast_done and now - t.heard_at < CHUNK_TIMEOUT_S:
            # The broadcast may still bring it: ask only once it is done or quiet.
            return
        if t.manifest is None:
            if now - t.asked_at >= CHUNK_TIMEOUT_S:
                t.asked_at = now
                req = artifact_pb2.ChunkRequest(digest=digest, want_manifest=True)
                self.client.publish(self.topic(Kind.ARTIFACT_REQUEST), encode(req), qos=1)
            return
        for i, at in list(t.outstanding.items()):
            if now - at >= CHUNK_TIMEOUT_S:
                del t.outstanding[i]
        todo = [
            i for i in range(len(t.manifest.chunk_sha256)) if i not in t.chunks and i not in t.outstanding
        ]
        for indices in chunk_requests(todo, WINDOW - len(t.outstanding), WINDOW):
            for i in indices:
                t.outstanding[i] = now
            req = artifact_pb2.ChunkRequest(digest=digest, indices=indices)
            self.client.publish(self.topic(Kind.ARTIFACT_REQUEST), encode(req), qos=1)

    def _activate(self, want: fleet_pb2.ModelAssignment) -> None:
        digest = want.artifact_digest
        if self.sessions is not None:
            try:
                session = self.sessions.get(digest, self.store[digest])
                i = session.get_inputs()[0]
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
                session.run(None, {i.name: np.zeros(shape, np.float32)})
            except Exception as exc:
                self.failed[digest] = f"staging failed: {exc}"
                return
        self.active = want
        self.applied_generation = self.desired_generation
        self.activated_at[digest] = time.time()
        if not self.keep_models:
            self.store = {digest: self.store[digest]}

    # -- outbound ---------------------------------------------------------------

    def report(self) -> None:
        if not self.connected.is_set():
            return
        msg = fleet_pb2.ReportedState(
            device_id=self.device_id,
            desired_generation=self.desired_generation,
            applied_generation=self.applied_generation,
            agent_version="sim",
        )
        a = self.active
        if a is not None:
            msg.models.add(
                tenant="default",
                model_name=a.model_name,
                model_version=a.model_version,
                artifact_digest=a.artifact_digest,
                phase=fleet_pb2.MODEL_PHASE_ACTIVE,
                rollout_id=a.rollout_id,
                outcome=fleet_pb2.UPDATE_OUTCOME_SUCCEEDED,
            )
        w = self.want
        if w is not None and (a is None or a.artifact_digest != w.artifact_digest):
            error = self.failed.get(w.artifact_digest, "")
            msg.models.add(
                tenant="default",
                model_name=w.model_name,
                model_version=w.model_version,
                artifact_digest=w.artifact_digest,
                phase=fleet_pb2.MODEL_PHASE_FAILED if error else fleet_pb2.MODEL_PHASE_DOWNLOADING,
                error=error,
                rollout_id=w.rollout_id,
                outcome=fleet_pb2.UPDATE_OUTCOME_FAILED if error else fleet_pb2.UPDATE_OUTCOME_UNSPECIFIED,
            )
        payload = encode(msg)
        if payload != self._last_report:
            self._last_report = payload
            msg.reported_at_ms = int(time.time() * 1000)
            self.client.publish(self.topic(Kind.REPORTED), encode(msg), qos=1, retain=True)

    def tick(self, now: float, inferences: int) -> None:
        with self.lock:
            self._ask(now)
            active = self.active
        if active is None or self.samples is None or self.sessions is None:
            return
        session = self.sessions.get(active.artifact_digest, self.store[active.artifact_digest])
        for _ in range(inferences):
            x = self.samples[self._rng.integers(len(self.samples))][None, :]
            start = time.perf_counter()
            try:
                session.run(None, {self.input_name: x})
                ok = True
            except Exception:
                ok = False
            elapsed = (time.perf_counter() - start) * 1000
            with self.lock:
                self.window.count += 1
                if ok:
                    self.window.latencies.append(elapsed)
                else:
                    self.window.errors += 1

    def publish_telemetry(self) -> None:
        with self.lock:
            w, self.window = self.window, _Window()
            active = self.active
            start, end = self.window_start_ms, int(time.time() * 1000)
            self.window_start_ms = end
            self.seq += 1
        if not self.connected.is_set():
            return
        msg = fleet_pb2.Telemetry(
            device_id=self.device_id, seq=self.seq, window_start_ms=start, window_end_ms=end
        )
        if active is not None and w.count:
            p50, p95, p99 = np.percentile(w.latencies, [50, 95, 99]) if w.latencies else (0.0, 0.0, 0.0)
            msg.models.add(
                tenant="default",
                model_name=active.model_name,
                model_version=active.model_version,
                inference_count=w.count,
                error_count=w.errors,
                latency_p50_ms=float(p50),
                latency_p95_ms=float(p95),
                latency_p99_ms=float(p99),
            )
        self.client.publish(self.topic(Kind.TELEMETRY), encode(msg), qos=1)


def _sha256_is(digest: str, data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == digest


class SimFleet:
    """Devices of one process and the thread that drives their timers, traffic and telemetry."""

    def __init__(
        self,
        devices: Sequence[SimDevice],
        telemetry_interval_s: float = 0.5,
        inferences_per_tick: int = 4,
        tick_s: float = 0.1,
    ) -> None:
        self.devices = list(devices)
        self.telemetry_interval_s = telemetry_interval_s
        self.inferences_per_tick = inferences_per_tick
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simfleet", daemon=True)

    def start(self) -> SimFleet:
        for d in self.devices:
            d.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        next_telemetry = time.monotonic() + self.telemetry_interval_s
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            for d in self.devices:
                if d.connected.is_set():
                    d.tick(now, self.inferences_per_tick)
            if now >= next_telemetry:
                next_telemetry = now + self.telemetry_interval_s
                for d in self.devices:
                    d.publish_telemetry()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for d in self.devices:
            if d.connected.is_set():
                d.stop()
            else:
                d.client.loop_stop()
