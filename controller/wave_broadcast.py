"""Wave broadcast: each artifact of a rollout wave published once, through the broker's fan-out.

A rollout in ``broadcast`` delivery gives every member's assignment its wave
(``WaveBroadcast.wave_id``). As a desired state goes out (:meth:`WaveBroadcaster.prepare`,
called by the transport before signing), the artifact keys are put in it (only the devices
assigned an artifact ever see its key) and, for the rollout's current wave, the device is
expected on the broadcast of each artifact it lacks; the first time, the broadcast's
announcement (its manifest, sealed) is published, retained, on the wave topic, before the
desired state, so a device that subscribes finds it.

A device that subscribed and holds the manifest says so (``ChunkRequest.listening``). The
broadcast starts once every expected device listens, or ``broadcast_grace_s`` after the
first one did; then each chunk is sealed (AES-256-GCM, edgefleet_proto.wave) and published
once at QoS 1, and the announcement is replaced by one that says ``done``. A device that
joined late, was offline or lost chunks asks for what it lacks by request, as without a
broadcast. Once the wave is no longer its rollout's current one the retained announcement
is cleared (MQTT 5 brokers also expire it after ``broadcast_retain_s``).

One thread sends: the broadcasts under way take turns, a chunk each.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode
from edgefleet_proto.wave import NONCE_BYTES, WaveError, WaveTopic, chunk_aad, chunk_nonce, manifest_aad

from controller.artifacts import ArtifactStore, chunk_count
from controller.errors import ArtifactNotFound
from controller.message_counters import MessageCounters

log = logging.getLogger(__name__)

# How often the sending thread looks at the broadcasts when nothing wakes it.
POLL_S = 0.1
# How often a broadcast's wave is asked whether it is still its rollout's current one.
CURRENT_CHECK_S = 1.0
# Chunks published and not yet acknowledged by the broker at most (paho holds the rest).
MAX_UNACKED = 200
# Waves remembered as over.
MAX_WAVES_OVER = 4096


class WavePublisher(Protocol):
    """What the broadcaster needs of the MQTT session: a QoS 1 publish on a wave topic."""

    def publish_wave(self, topic: str, payload: bytes, retain: bool) -> Any: ...


def seal_chunk(key: bytes, digest: str, chunk_size: int, index: int, data: bytes) -> bytes:
    nonce = chunk_nonce(digest, chunk_size, index)
    return AESGCM(key).encrypt(nonce, data, chunk_aad(digest, chunk_size, index))


def seal_announcement(
    key: bytes, manifest: artifact_pb2.ArtifactManifest, done: bool
) -> artifact_pb2.WaveFrame:
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, encode(manifest), manifest_aad(manifest.digest))
    announcement = artifact_pb2.WaveAnnouncement(nonce=nonce, sealed_manifest=sealed, done=done)
    return artifact_pb2.WaveFrame(digest=manifest.digest, announcement=announcement)


@dataclass
class Broadcast:
    topic: WaveTopic
    key: bytes
    manifest: artifact_pb2.ArtifactManifest
    # Devices sent a desired state with this artifact in this wave, and those listening.
    expected: set[str] = field(default_factory=set)
    listening: set[str] = field(default_factory=set)
    first_listener_at: float | None = None
    # "announced", "sending" or "done".
    state: str = "announced"

    def due(self, now: float, grace_s: float) -> bool:
        """Whether to send now: every expected device listens, or the grace since the first ran out."""
        if self.state != "announced" or self.first_listener_at is None:
            return False
        return self.expected <= self.listening or now >= self.first_listener_at + grace_s


@dataclass(eq=False)
class Sending:
    """A broadcast under way: its next chunk, how many in all, since when, bytes so far."""

    broadcast: Broadcast
    count: int
    began: float
    next: int = 0
    bytes: int = 0


class WaveBroadcaster:
    def __init__(
        self,
        artifacts: ArtifactStore,
        publisher: WavePublisher,
        is_current: Callable[[str], bool],
        counters: MessageCounters,
        grace_s: float,
        bytes_per_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.artifacts = artifacts
        self.publisher = publisher
        self.is_current = is_current
        self.counters = counters
        self.grace_s = grace_s
        self.bytes_per_s = bytes_per_s
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._broadcasts: dict[str, Broadcast] = {}
        # Waves found over (a wave is current once, then never again), newest last.
        self._over: OrderedDict[str, None] = OrderedDict()
        self._checked_at = 0.0
        self._thread: threading.Thread | None = None
        # The sending thread's own: broadcasts under way, chunks not yet acknowledged, pacing.
        self._sending: list[Sending] = []
        self._unacked: list[Any] = []
        self._paced_from = 0.0
        self._paced_bytes = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="wave-broadcast", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- desired states going out -----------------------------------------------

    def prepare(self, device_id: str, payload: bytes) -> bytes:
        """The desired state ``payload`` with the keys of its broadcast artifacts; the device is
        expected on the broadcasts of its rollout's current wave (announced here, first time)."""
        try:
            desired = decode_as(fleet_pb2.DesiredState, payload)
        except PayloadError as exc:
            log.error("desired state not prepared for broadcast device=%s error=%s", device_id, exc)
            return payload
        changed = False
        for model in desired.models:
            if not model.HasField("broadcast") or not model.broadcast.wave_id:
                continue
            wave = model.broadcast.wave_id
            pieces = [(model.artifact_digest, "artifact_key")]
            if model.sample_digest:
                pieces.append((model.sample_digest, "sample_key"))
            for digest, slot in pieces:
                try:
                    key = self.artifacts.wave_key(digest)
                except (ArtifactNotFound, OSError) as exc:
                    log.error("no broadcast key device=%s digest=%s error=%s", device_id, digest[:12], exc)
                    continue
                setattr(model.broadcast, slot, key)
                changed = True
                self._expect(wave, digest, key, device_id)
        return encode(desired) if changed else payload

    def _expect(self, wave: str, digest: str, key: bytes, device_id: str) -> None:
        try:
            topic = WaveTopic(wave, digest)
        except WaveError as exc:
            log.error("assignment names a bad wave device=%s error=%s", device_id, exc)
            return
        name = str(topic)
        with self._lock:
            broadcast = self._broadcasts.get(name)
            if broadcast is not None:
                if broadcast.state == "announced":
                    broadcast.expected.add(device_id)
                return
            if wave in self._over:
                return
        if not self.is_current(wave):
            # Asked once per wave: a republish of every desired state names many waves long over.
            with self._lock:
                self._over[wave] = None
                while len(self._over) > MAX_WAVES_OVER:
                    self._over.popitem(last=False)
            return
        try:
            manifest = self.artifacts.manifest(digest)
        except (ArtifactNotFound, OSError) as exc:
            log.error("broadcast not announced wave=%s digest=%s error=%s", wave, digest[:12], exc)
            return
        broadcast = Broadcast(topic, key, manifest, expected={device_id})
        with self._lock:
            if name in self._broadcasts:
                self._broadcasts[name].expected.add(device_id)
                return
            self._broadcasts[name] = broadcast
        self._announce(broadcast, done=False)
        log.info("wave broadcast announced wave=%s digest=%s size=%d", wave, digest[:12], manifest.size)

    # -- devices -----------------------------------------------------------------

    def listening(self, device_id: str, digest: str) -> bool:
        """A device listens on the broadcast of ``digest`` it is expected on; False when none waits for it."""
        now = self.clock()
        with self._lock:
            for broadcast in self._broadcasts.values():
                if broadcast.topic.digest != digest or device_id not in broadcast.expected:
                    continue
                if broadcast.state != "announced":
                    return False
                broadcast.listening.add(device_id)
                if broadcast.first_listener_at is None:
                    broadcast.first_listener_at = now
                if broadcast.expected <= broadcast.listening:
                    self._wake.set()
                return True
        return False

    # -- the sending thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._sending:
                self._wake.wait(POLL_S)
                self._wake.clear()
            try:
                self._step()
            except Exception:
                log.exception("wave broadcast step failed")

    def _step(self) -> None:
        now = self.clock()
        with self._lock:
            due = [b for b in self._broadcasts.values() if b.due(now, self.grace_s)]
            for b in due:
                b.state = "sending"
        for b in due:
            self._begin(b)
        # One chunk of each broadcast under way in turn: a wave's small artifacts (sample
        # inputs) do not wait behind its model, nor one wave behind another.
        for sending in list(self._sending):
            if self._stopping.is_set():
                return
            try:
                if sending.next < sending.count:
                    self._send_chunk(sending)
                    continue
            except (ArtifactNotFound, OSError) as exc:
                # Said done all the same: its devices ask for what it did not send.
                log.error(
                    "wave broadcast cut short wave=%s digest=%s error=%s",
                    sending.broadcast.topic.wave_id,
                    sending.broadcast.topic.digest[:12],
                    exc,
                )
            self._finish(sending)
        if now - self._checked_at >= CURRENT_CHECK_S:
            self._checked_at = now
            self._forget_ended()

    def _begin(self, b: Broadcast) -> None:
        count = chunk_count(b.manifest.size, b.manifest.chunk_size)
        if not self._sending:
            self._paced_from, self._paced_bytes = self.clock(), 0
        self._sending.append(Sending(b, count, self.clock()))
        log.info(
            "wave broadcast started wave=%s digest=%s chunks=%d listening=%d expected=%d",
            b.topic.wave_id,
            b.topic.digest[:12],
            count,
            len(b.listening),
            len(b.expected),
        )

    def _send_chunk(self, sending: Sending) -> None:
        b, index = sending.broadcast, sending.next
        digest, chunk_size = b.topic.digest, b.manifest.chunk_size
        chunk = self.artifacts.read_chunk(digest, index)
        sealed = seal_chunk(b.key, digest, chunk_size, index, chunk.data)
        frame = artifact_pb2.WaveFrame(
            digest=digest, chunk=artifact_pb2.SealedChunk(index=index, sealed=sealed)
        )
        payload = encode(frame)
        self._unacked = self._within_window(self._unacked)
        self._unacked.append(self.publisher.publish_wave(str(b.topic), payload, retain=False))
        sending.next += 1
        sending.bytes += len(payload)
        self.counters.broadcast_bytes(len(payload))
        self._pace(len(payload))

    def _finish(self, sending: Sending) -> None:
        b = sending.broadcast
        self._announce(b, done=True)
        with self._lock:
            b.state = "done"
        self._sending.remove(sending)
        log.info(
            "wave broadcast done wave=%s digest=%s chunks=%d bytes=%d seconds=%.2f",
            b.topic.wave_id,
            b.topic.digest[:12],
            sending.count,
            sending.bytes,
            self.clock() - sending.began,
        )

    def _within_window(self, unacked: list[Any]) -> list[Any]:
        """Wait while too many chunks are unacknowledged, so paho does not hold a whole model."""
        unacked = [info for info in unacked if not info.is_published()]
        while len(unacked) >= MAX_UNACKED and not self._stopping.is_set():
            time.sleep(0.005)
            unacked = [info for info in unacked if not info.is_published()]
        return unacked

    def _pace(self, sent: int) -> None:
        """Keep all broadcasts together within broadcast_bytes_per_s."""
        if self.bytes_per_s <= 0:
            return
        self._paced_bytes += sent
        ahead = self._paced_from + self._paced_bytes / self.bytes_per_s - self.clock()
        if ahead > 0:
            self._stopping.wait(ahead)

    def _announce(self, b: Broadcast, done: bool) -> None:
        frame = seal_announcement(b.key, b.manifest, done)
        payload = encode(frame)
        self.publisher.publish_wave(str(b.topic), payload, retain=True)
        self.counters.broadcast_bytes(len(payload))

    def _forget_ended(self) -> None:
        """Clear the retained announcement of broadcasts whose wave is over, and forget them."""
        with self._lock:
            candidates = [b for b in self._broadcasts.values() if b.state != "sending"]
        for b in candidates:
            if self.is_current(b.topic.wave_id):
                continue
            with self._lock:
                if b.state == "sending":
                    continue
                self._broadcasts.pop(str(b.topic), None)
                self._over[b.topic.wave_id] = None
            self.publisher.publish_wave(str(b.topic), b"", retain=True)
            log.info("wave broadcast cleared wave=%s digest=%s", b.topic.wave_id, b.topic.digest[:12])
