"""The controller's MQTT session (paho-mqtt 2.x).

Paho's network thread only parses topics and decodes payloads; the work goes
to three worker threads (state, telemetry, and artifact chunks, so a fleet
downloading does not delay reported state). One artifact thread is enough:
serving a chunk is a dictionary look-up, a pread and a publish, and with the GIL
more threads only added contention (4 threads made bench/rollout_fleet.py's
transfers 30 % slower than 1). Nothing raised by a message escapes a callback:
a bad message is logged with its device and topic and dropped.

The session reconnects with jittered exponential backoff and, on every
(re)connect, republishes each device's desired state: the broker may have
lost its retained messages.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.broker_tls import BrokerTls, LastError, TlsSetupError, explain
from edgefleet_proto.codec import PayloadError, decode, encode
from edgefleet_proto.topics import Kind, Topic, TopicError, fleet_subscription
from google.protobuf.message import Message
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from controller.artifacts import ArtifactStore, chunk_count
from controller.backoff import backoff_delay
from controller.certificates import certificate_problem
from controller.device_events import DeviceEvents
from controller.device_quotas import CaptureQuota, TelemetryQuota
from controller.errors import ArtifactNotFound, ConfigError, ControllerError, DatabaseUnavailable
from controller.fleet import Fleet
from controller.log_bounds import BadMessageLog, clip
from controller.message_counters import MessageCounters
from controller.rate_limits import MAX_BUCKETS, DeviceBuckets, Limit, NewestWins
from controller.roles import every_filter
from controller.settings import Settings
from controller.telemetry import TelemetryStore
from controller.wave_broadcast import WaveBroadcaster

log = logging.getLogger(__name__)

INBOUND = (
    Kind.REPORTED,
    Kind.STATUS,
    Kind.TELEMETRY,
    Kind.EVENTS,
    Kind.ARTIFACT_REQUEST,
    Kind.CAPTURE,
    Kind.DESIRED_REQUEST,
)
# What devices keep on the broker (a device twin); every other inbound kind is only
# ingested, so a retained copy of one is junk: refused, and cleared on the broker.
RETAINED_KINDS = frozenset({Kind.REPORTED, Kind.STATUS})
QOS = 1
KEEPALIVE_S = 30
SESSION_EXPIRY_S = 7 * 24 * 3600
MAX_QUEUED_JOBS = 100_000
# A well-behaved agent keeps `window` (default 8) chunks outstanding.
MAX_INDICES_PER_REQUEST = 64
# Telemetry windows written per SQLite transaction: whatever queued up while
# the previous batch was being written, up to this many.
MAX_INGEST_BATCH = 500
# The longest wait between two attempts to reach a database that went away.
DATABASE_RETRY_MAX_S = 5.0
# The artifact worker writes the last_seen times held back (Fleet.note_seen) this often.
SEEN_FLUSH_S = 1.0
# QoS 1 publishes sent and not yet acknowledged. paho's default of 20 held chunk
# replies back, to be sent by the network thread one per PUBACK. MQTT 5 brokers
# announce their own limit (Receive Maximum) and the session is reopened with it
# if lower; deploy/mosquitto/edgefleet.conf's max_inflight_messages 100 is announced as 100.
MAX_INFLIGHT = 100


@dataclass(frozen=True)
class Inbound:
    topic: Topic
    message: Message
    received_at: float
    retained: bool


@dataclass(frozen=True)
class Arrived:
    """A message as it arrived, before decoding (held so while over its rate limit)."""

    topic: Topic
    payload: bytes
    received_at: float
    retained: bool


@dataclass(frozen=True)
class Republish:
    reason: str


Job = Inbound | Republish | None


class Transport:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        telemetry: TelemetryStore,
        artifacts: ArtifactStore,
        sign_desired: Callable[[str, bytes], bytes] | None = None,
        wave_is_current: Callable[[str], bool] | None = None,
        username: str | None = None,
        subscriptions: Sequence[tuple[str, Kind]] | None = None,
        republish_on_connect: bool = True,
    ) -> None:
        self.settings = settings
        # The broker account of this process (controller.roles.account): one per process
        # connected at once, since the broker binds the client id to the username.
        self.username = username or settings.mqtt_username
        # What this process receives (controller.roles.subscriptions): by default every inbound
        # kind on the plain fleet filters, as a controller with every role.
        self._filters = (
            list(subscriptions)
            if subscriptions is not None
            else [(fleet_subscription(k), k) for k in INBOUND]
        )
        # Whether each (re)connection republishes every desired state: the processes that run
        # the rollout engine do; the broker's retained copies need no more than that.
        self._republish_on_connect = republish_on_connect
        # Signs each stored desired state as it goes out (Controller.sign_desired), so every
        # publication, republished ones too, carries the current key's signature. Without it
        # (tests of the session alone) states go out as given and agents pinning a key refuse them.
        self.sign_desired = sign_desired
        self.fleet = fleet
        self.telemetry = telemetry
        self.artifacts = artifacts
        self.connected = threading.Event()
        # Set once the broker has answered this connection's SUBSCRIBE, and the UNSUBSCRIBE of what
        # a kept session had from other roles: from then on the process receives what its roles ask
        # for and nothing else. Being connected says neither: publishes may reach the broker first.
        self.subscribed = threading.Event()
        # Counted, not just flagged: a reconnect can be faster than anyone polling `connected`.
        self.disconnects = 0
        self._stopping = threading.Event()
        self._v5 = settings.mqtt_protocol == "v5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # The broker binds client ids to usernames (use_username_as_clientid in
            # deploy/mosquitto/edgefleet.conf): the persistent session is the username's.
            client_id=self.username,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False,
        )
        self._client.username_pw_set(self.username, settings.mqtt_password)
        self._tls = _broker_tls(settings)
        self._paho_errors = LastError()
        self._client.enable_logger(self._paho_errors.logger())
        context = broker_tls_context(settings)
        # Publishes come from the worker threads, and paho writes a publish from the calling
        # thread unless a write callback is registered. Two threads writing at once interleave
        # the pieces of two large packets on plain TCP (the broker closes the session for a
        # malformed packet) and corrupt OpenSSL's state on TLS ("bad record mac"). With the
        # callback, paho only queues them and wakes the network thread, the one writer.
        self._client.on_socket_register_write = _written_by_the_network_thread
        if context is not None:
            self._client.tls_set_context(context)
        else:
            log.warning(
                "mqtt connection to the broker is unencrypted broker=%s:%d: plain TCP is for a broker on "
                "this machine; set mqtt_tls_ca_file in controller.toml for TLS",
                settings.broker_host,
                settings.broker_port,
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._inflight_limit = MAX_INFLIGHT
        # The brokers this controller may use, in order; the one in use is self._addresses[self._at].
        self._addresses = settings.broker_addresses()
        self._at = 0
        # SUBSCRIBE packets awaiting their SUBACK (mid -> filters), and refusals in a row: a broker
        # may refuse a subscription for a while (NATS while its JetStream elects leaders), and a
        # session missing one would never hear that kind of message again.
        self._subscribing: dict[int, list[tuple[str, Any]]] = {}
        # UNSUBSCRIBE packets awaiting their UNSUBACK (mid -> filters).
        self._unsubscribing: dict[int, list[str]] = {}
        self._refusals = 0
        self._state_jobs: queue.Queue[Job] = queue.Queue(MAX_QUEUED_JOBS)
        self._artifact_jobs: queue.Queue[Job] = queue.Queue(MAX_QUEUED_JOBS)
        self._telemetry_jobs: queue.Queue[Job] = queue.Queue(MAX_QUEUED_JOBS)
        # Set by the controller to store captured data set chunks (controller.datasets).
        self.on_capture: Callable[[str, fleet_pb2.CaptureChunk, float], object] | None = None
        self._acks_lock = threading.Lock()
        # Device topics, or a wave broadcast's topic as text.
        self._inflight: dict[int, Topic | str] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._attempt = 0
        self._threads: list[threading.Thread] = []
        # Telemetry windows handled in the ingest transaction under way, acknowledged once it commits.
        self._stored_windows: list[tuple[str, int]] = []
        # Windows this process acknowledged (stored, or found stored before): with several ingest
        # processes, each one's share.
        self.windows_acknowledged = 0
        # Per-device limits (docs/rest-api.md, "Controller limits"), counted on /metrics.
        self.counters = MessageCounters()
        self._chunk_requests = DeviceBuckets(
            Limit("chunk_requests", settings.chunk_requests_per_s, settings.chunk_requests_burst)
        )
        self._chunk_bytes = DeviceBuckets(
            Limit("chunk_bytes", settings.chunk_bytes_per_s, settings.chunk_bytes_burst)
        )
        self._events_limit = DeviceBuckets(Limit("events", settings.events_per_s, settings.events_burst))
        # Reported states and status are snapshots: over the rate the newest waits (NewestWins).
        self._twin: NewestWins[Arrived] = NewestWins(
            DeviceBuckets(Limit("reported", settings.reported_per_s, settings.reported_burst))
        )
        # Reported states and status that found the state queue full. Each is sent once per change
        # (telemetry is sent again until acknowledged), so rather than be dropped the newest of each
        # device and kind waits here for room (_release_held), replacing the one that waited before.
        self._waiting_room: OrderedDict[tuple[str, str], Inbound] = OrderedDict()
        self._waiting_lock = threading.Lock()
        self._desired_requests = DeviceBuckets(
            Limit("desired_requests", settings.desired_requests_per_s, settings.desired_requests_burst)
        )
        self._bad = BadMessageLog(log, settings.bad_message_logs_per_s)
        self.events = DeviceEvents(fleet.store, settings.events_quota, self.counters)
        self._telemetry_quota = TelemetryQuota(fleet.store, settings.telemetry_quota_bytes, self.counters)
        # Set by the controller beside on_capture (it knows where uploads are staged).
        self.capture_quota: CaptureQuota | None = None
        # Wave broadcast (controller.wave_broadcast), given the rollouts' answer to "is this
        # wave its rollout's current one"; without it (tests of the session alone) none is sent.
        self.waves: WaveBroadcaster | None = None
        if wave_is_current is not None:
            self.waves = WaveBroadcaster(
                artifacts,
                self,
                wave_is_current,
                self.counters,
                settings.broadcast_grace_s,
                settings.broadcast_bytes_per_s,
            )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self.telemetry.observers.append(self._telemetry_quota.observe)
        self._threads = [
            threading.Thread(target=self._run_network, name="mqtt-network", daemon=True),
            threading.Thread(
                target=self._run_worker, args=(self._state_jobs,), name="mqtt-state", daemon=True
            ),
            threading.Thread(target=self._run_artifacts, name="mqtt-artifacts", daemon=True),
            threading.Thread(target=self._run_ingest, name="mqtt-ingest", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if self.waves is not None:
            self.waves.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self.waves is not None:
            self.waves.stop(timeout)
        try:
            self._client.disconnect()
        except Exception as exc:  # paho may raise on a half-open socket; we are leaving anyway
            log.debug("mqtt disconnect failed error=%s", exc)
        self._state_jobs.put(None)
        self._artifact_jobs.put(None)
        self._telemetry_jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._flush_seen()
        self._flush_counters()
        if self._telemetry_quota.observe in self.telemetry.observers:
            self.telemetry.observers.remove(self._telemetry_quota.observe)
        self.connected.clear()
        log.info("mqtt transport stopped windows_acknowledged=%d", self.windows_acknowledged)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        return self.subscribed.wait(timeout)

    def _reason(self, error: BaseException | str) -> str:
        """Why connecting failed, in words naming the cause (a wrong CA, an expired certificate)."""
        return explain(error, self._tls, self.address[0], lambda path: certificate_problem(Path(path)))

    @property
    def address(self) -> tuple[str, int]:
        """The broker in use, or tried next."""
        return self._addresses[self._at]

    def _run_network(self) -> None:
        while not self._stopping.is_set():
            host, port = self.address
            try:
                if self._client.max_inflight_messages != self._inflight_limit:
                    self._client.max_inflight_messages_set(self._inflight_limit)
                if self._v5:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = SESSION_EXPIRY_S
                    self._client.connect(host, port, KEEPALIVE_S, clean_start=False, properties=props)
                else:
                    self._client.connect(host, port, KEEPALIVE_S)
                while not self._stopping.is_set():
                    if self._client.loop(timeout=0.5) != mqtt.MQTT_ERR_SUCCESS:
                        break
            except Exception as exc:  # socket errors, TLS refusals and anything paho raises: retry
                log.warning("mqtt connection failed broker=%s:%d error=%s", host, port, self._reason(exc))
            was_up = self.connected.is_set()
            self.connected.clear()
            self.subscribed.clear()
            if self._stopping.is_set():
                break
            self._attempt += 1
            if not was_up and len(self._addresses) > 1:
                # A broker that could not be reached: the next of the cluster, in turn. The backoff
                # grows per round over the list, so a dead node does not delay a live one.
                self._at = (self._at + 1) % len(self._addresses)
            rounds = self._attempt // len(self._addresses)
            delay = backoff_delay(rounds) if rounds else 0.2
            host, port = self.address
            log.info("mqtt reconnecting broker=%s:%d attempt=%d in_s=%.2f", host, port, self._attempt, delay)
            self._stopping.wait(delay)

    # -- paho callbacks (network thread): no disk I/O, no exceptions out ----

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "broker refused the connection broker=%s:%d user=%s reason=%s",
                *self.address,
                self.username,
                reason_code,
            )
            return
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if receive_maximum is not None and receive_maximum < self._inflight_limit:
            log.warning(
                "broker takes fewer publishes in flight, reconnecting within its limit broker=%s:%d "
                "receive_maximum=%d in_flight=%d",
                *self.address,
                receive_maximum,
                self._inflight_limit,
            )
            self._inflight_limit = receive_maximum
            client.disconnect()
            return
        self._attempt = 0
        log.info(
            "mqtt connected broker=%s:%d protocol=%s user=%s session_present=%s",
            *self.address,
            self.settings.mqtt_protocol,
            self.username,
            getattr(flags, "session_present", None),
        )
        try:
            with self._acks_lock:
                # Packets of an earlier connection are never answered on this one.
                self.subscribed.clear()
                self._subscribing.clear()
                self._unsubscribing.clear()
                self._refusals = 0
            filters = self._subscriptions()
            if filters:
                self._subscribe(filters)
            self._unsubscribe_stale(client, flags)
            self._note_subscribed()
            if self._republish_on_connect:
                self._enqueue(self._state_jobs, Republish(reason="connected"))
        except Exception:
            log.exception("mqtt subscribe after connect failed")
        self.connected.set()

    def _subscriptions(self) -> list[tuple[str, Any]]:
        """One filter per inbound kind this process receives. With MQTT 5, ingest-only kinds
        keep the retain flag as published, so a device's retained publish is recognised (and
        refused) live, not only when the broker replays it at the next subscribe."""
        if not self._v5:
            return [(topic, QOS) for topic, _ in self._filters]
        return [
            (topic, SubscribeOptions(qos=QOS, retainAsPublished=kind not in RETAINED_KINDS))
            for topic, kind in self._filters
        ]

    def _unsubscribe_stale(self, client: mqtt.Client, flags: Any) -> None:
        """A persistent session keeps the subscriptions of the roles its account had before (an
        ingest process restarted as chunks): drop those, or their messages would keep coming here."""
        if not getattr(flags, "session_present", False):
            return
        mine = {topic for topic, _ in self._filters}
        # MQTT 3.1.1 brokers (NATS) have no shared subscriptions: nothing of the kind to drop.
        stale = [t for t in every_filter() if t not in mine and (self._v5 or not t.startswith("$share/"))]
        if stale:
            with self._acks_lock:
                _, mid = client.unsubscribe(stale)
                if mid is not None:
                    self._unsubscribing[mid] = stale

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        try:
            with self._acks_lock:
                stale = self._unsubscribing.pop(mid, [])
            # Whatever each code ("no subscription existed" is the usual one), none of these is left.
            log.debug("mqtt filters of other roles unsubscribed topics=%s", ",".join(stale))
            self._note_subscribed()
        except Exception:
            log.exception("unsuback handling failed mid=%d", mid)

    def _note_subscribed(self) -> None:
        """Set `subscribed` once nothing asked of the broker on this connection awaits its answer
        (nor a refused subscription its retry)."""
        with self._acks_lock:
            settled = not self._subscribing and not self._unsubscribing and not self._refusals
        if settled:
            self.subscribed.set()

    def republish(self, reason: str) -> None:
        """Publish every stored desired state again (queued for the state worker)."""
        self._enqueue(self._state_jobs, Republish(reason=reason))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        self.disconnects += 1
        paho_error = self._paho_errors.take()
        if self._stopping.is_set():
            return
        if was_connected or not paho_error:
            log.warning("mqtt disconnected reason=%s", reason_code)
        else:
            # Ended before CONNACK: under TLS 1.3 this is how a refused client certificate shows.
            log.warning(
                "mqtt connection failed broker=%s:%d error=%s",
                *self.address,
                self._reason(paho_error),
            )

    def _subscribe(self, filters: list[tuple[str, Any]]) -> None:
        with self._acks_lock:
            _, mid = self._client.subscribe(filters)
            if mid is not None:
                self._subscribing[mid] = filters

    def _subscribe_again(self, filters: list[tuple[str, Any]]) -> None:
        """Timer thread: ask again for what the broker refused, on the session of the moment (one
        that went down in between subscribes to everything when it comes back)."""
        try:
            if self.connected.is_set() and not self._stopping.is_set():
                log.info("mqtt subscribing again topics=%s", ",".join(topic for topic, _ in filters))
                self._subscribe(filters)
        except Exception:
            log.exception("mqtt subscribing again failed")

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        try:
            with self._acks_lock:
                filters = self._subscribing.pop(mid, [])
            refused = [f for f, code in zip(filters, reason_codes, strict=False) if code.is_failure]
            for (topic, _), code in zip(filters, reason_codes, strict=False):
                if code.is_failure:
                    log.error("mqtt subscription refused topic=%s reason=%s", topic, code)
            if refused:
                self._refusals += 1
                timer = threading.Timer(backoff_delay(self._refusals), self._subscribe_again, args=(refused,))
                timer.daemon = True
                timer.start()
            elif self._refusals:
                self._refusals = 0
                log.info("mqtt subscriptions complete")
            self._note_subscribed()
        except Exception:
            log.exception("suback handling failed mid=%d", mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._accept(msg)
        except Exception:
            log.exception("mqtt message dropped topic=%s", msg.topic)

    def _accept(self, msg: mqtt.MQTTMessage) -> None:
        """Parse, check and queue one message (network thread: cheap checks only, and the
        per-device rate limits before decoding, so a flood costs little)."""
        try:
            topic = Topic.parse(msg.topic)
        except TopicError as exc:
            self.counters.rejected("unknown", "bad_topic")
            self._bad.warning("-", "mqtt message ignored topic=%s reason=%s", msg.topic, exc)
            return
        if topic.kind not in INBOUND:
            self.counters.rejected(topic.kind.value, "unexpected_kind")
            self._bad.warning(
                topic.device_id,
                "mqtt message ignored device=%s topic=%s reason=unexpected kind",
                topic.device_id,
                msg.topic,
            )
            return
        if not msg.payload:
            # An empty retained payload only clears the broker's copy (ours included).
            self._bad.log(
                logging.INFO,
                topic.device_id,
                "empty payload ignored device=%s topic=%s",
                topic.device_id,
                msg.topic,
            )
            return
        if msg.retain and topic.kind not in RETAINED_KINDS:
            self._refuse_retained(topic)
            return
        if not self._within_rate(topic):
            return
        arrived = Arrived(topic, bytes(msg.payload), time.time(), bool(msg.retain))
        if topic.kind in RETAINED_KINDS and not self._twin_within_rate(arrived):
            return
        self._queue(arrived)

    def _queue(self, arrived: Arrived) -> None:
        topic = arrived.topic
        try:
            message = decode(topic.kind, arrived.payload)
        except PayloadError as exc:
            self.counters.rejected(topic.kind.value, "undecodable")
            self._bad.warning(
                topic.device_id,
                "payload rejected device=%s topic=%s reason=%s",
                topic.device_id,
                topic,
                exc,
            )
            return
        job = Inbound(
            topic=topic, message=message, received_at=arrived.received_at, retained=arrived.retained
        )
        if topic.kind in RETAINED_KINDS:
            self._queue_snapshot(job)
            return
        target = self._artifact_jobs if topic.kind is Kind.ARTIFACT_REQUEST else self._state_jobs
        if topic.kind is Kind.TELEMETRY:
            target = self._telemetry_jobs
        self._enqueue(target, job)

    def _twin_within_rate(self, arrived: Arrived) -> bool:
        """The per-device limit on reported states and status: over it, the newest one waits
        (undecoded) for :meth:`_release_held`, replacing the one that waited before."""
        topic = arrived.topic
        now, dropped = self._twin.offer(topic.device_id, topic.kind.value, arrived)
        if dropped:
            self.counters.rejected(topic.kind.value, "superseded", dropped)
        if now:
            return True
        self.counters.rate_limited(topic.device_id, self._twin.buckets.limit.name)
        self._bad.warning(
            topic.device_id,
            "message over the device's rate limit held back, the newest kept device=%s topic=%s limit=%s"
            " per_s=%g burst=%g",
            topic.device_id,
            topic,
            self._twin.buckets.limit.name,
            self._twin.buckets.limit.rate,
            self._twin.buckets.limit.burst,
        )
        return False

    def _queue_snapshot(self, job: Inbound) -> None:
        """Queue a reported state or status, or keep it in the waiting room while the queue is full."""
        key = (job.topic.device_id, job.topic.kind.value)
        with self._waiting_lock:
            if self._waiting_room.pop(key, None) is not None:
                self.counters.rejected(key[1], "superseded")
            try:
                self._state_jobs.put_nowait(job)
                return
            except queue.Full:
                pass
            self._waiting_room[key] = job
            while len(self._waiting_room) > MAX_BUCKETS:
                (_, kind), _ = self._waiting_room.popitem(last=False)
                self.counters.rejected(kind, "overloaded")
        self._bad.warning(
            job.topic.device_id,
            "controller overloaded, message waits for room, the newest kept device=%s topic=%s",
            job.topic.device_id,
            job.topic,
        )

    def _release_held(self) -> None:
        for arrived in self._twin.due():
            self._queue(arrived)
        with self._waiting_lock:
            while self._waiting_room:
                key, job = next(iter(self._waiting_room.items()))
                try:
                    self._state_jobs.put_nowait(job)
                except queue.Full:
                    break
                del self._waiting_room[key]

    def _enqueue(self, jobs: queue.Queue[Job], job: Job) -> None:
        try:
            jobs.put_nowait(job)
        except queue.Full:
            if isinstance(job, Inbound):
                self.counters.rejected(job.topic.kind.value, "overloaded")
                self._bad.log(
                    logging.ERROR,
                    job.topic.device_id,
                    "controller overloaded, message dropped device=%s topic=%s",
                    job.topic.device_id,
                    job.topic,
                )
            else:
                log.error("controller overloaded, job dropped job=%s", job)

    def _refuse_retained(self, topic: Topic) -> None:
        """A retained message on a kind that is only ingested would come back at every
        reconnect: refuse it and clear the broker's copy (an empty retained payload)."""
        self.counters.rejected(topic.kind.value, "retained")
        self._bad.warning(
            topic.device_id,
            "retained message refused and cleared device=%s topic=%s reason=%s is never retained",
            topic.device_id,
            topic,
            topic.kind.value,
        )
        self._publish(topic, b"", retain=True)

    def _within_rate(self, topic: Topic) -> bool:
        """The per-device limits on chunk requests and events (counted when they bite)."""
        buckets = {
            Kind.ARTIFACT_REQUEST: self._chunk_requests,
            Kind.EVENTS: self._events_limit,
            Kind.DESIRED_REQUEST: self._desired_requests,
        }.get(topic.kind)
        if buckets is None or buckets.allow(topic.device_id):
            return True
        self.counters.rejected(topic.kind.value, "rate_limited")
        self.counters.rate_limited(topic.device_id, buckets.limit.name)
        self._bad.warning(
            topic.device_id,
            "message over the device's rate limit dropped device=%s topic=%s limit=%s per_s=%g burst=%g",
            topic.device_id,
            topic,
            buckets.limit.name,
            buckets.limit.rate,
            buckets.limit.burst,
        )
        return False

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        try:
            with self._acks_lock:
                topic = self._inflight.pop(mid, None)
                if topic is None:
                    self._early_acks[mid] = reason_code
                    return
            self._check_ack(topic, reason_code)
        except Exception:
            log.exception("puback handling failed mid=%d", mid)

    # -- publishing ------------------------------------------------------

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        if self.waves is not None:
            # Before signing: the broadcast keys go inside the signed state, and the wave's
            # announcement is published before the state that makes the device subscribe.
            payload = self.waves.prepare(device_id, payload)
        if self.sign_desired is not None:
            try:
                payload = self.sign_desired(device_id, payload)
            except ControllerError as exc:
                log.error("desired state not published: not signed device=%s error=%s", device_id, exc)
                return
        self._publish(Topic(device_id, Kind.DESIRED), payload, retain=True)

    def publish_wave(self, topic: str, payload: bytes, retain: bool) -> mqtt.MQTTMessageInfo:
        """A QoS 1 publish on a wave's broadcast topic; a retained one expires on an MQTT 5 broker
        after broadcast_retain_s, should the controller never clear it."""
        props = None
        if retain and payload and self._v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = self.settings.broadcast_retain_s
        info = self._client.publish(topic, payload, qos=QOS, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("wave publish failed topic=%s error=%s", topic, mqtt.error_string(info.rc))
            return info
        with self._acks_lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = topic
                return info
        self._check_ack(topic, early)
        return info

    def _publish(self, topic: Topic, payload: bytes, retain: bool) -> None:
        info = self._client.publish(str(topic), payload, qos=QOS, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.warning("broker not connected, publish queued device=%s topic=%s", topic.device_id, topic)
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.error(
                "mqtt publish failed device=%s topic=%s error=%s",
                topic.device_id,
                topic,
                mqtt.error_string(info.rc),
            )
            return
        with self._acks_lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = topic
                return
        self._check_ack(topic, early)

    def _check_ack(self, topic: Topic | str, reason_code: ReasonCode) -> None:
        if isinstance(topic, str):
            if reason_code.is_failure:
                log.error("broker refused wave publish topic=%s reason=%s", topic, reason_code)
            return
        if reason_code.is_failure:
            level = logging.ERROR if topic.kind is Kind.DESIRED else logging.WARNING
            log.log(
                level,
                "broker refused publish device=%s topic=%s reason=%s",
                topic.device_id,
                topic,
                reason_code,
            )

    # -- workers -----------------------------------------------------------

    def _run_worker(self, jobs: queue.Queue[Job]) -> None:
        while (job := jobs.get()) is not None:
            self._run_job(job)

    def _run_artifacts(self) -> None:
        flush_at = time.monotonic() + SEEN_FLUSH_S
        while True:
            if time.monotonic() >= flush_at:
                self._release_held()
                self._flush_seen()
                self._flush_counters()
                flush_at = time.monotonic() + SEEN_FLUSH_S
            try:
                job = self._artifact_jobs.get(timeout=SEEN_FLUSH_S)
            except queue.Empty:
                continue
            if job is None:
                return
            self._run_job(job)

    def _run_job(self, job: Inbound | Republish) -> None:
        try:
            self._while_database_is_away(lambda: self._run_job_once(job), "message kept")
        except DatabaseUnavailable:
            log.warning("message not handled at stop: the database was away job=%s", type(job).__name__)

    def _while_database_is_away(self, work: Callable[[], None], what: str) -> None:
        """Run ``work``, again and again while the database cannot be reached: what waits in the
        queues meanwhile is neither handled nor acknowledged, and the queues' bound holds the
        broker back (back-pressure). Raises DatabaseUnavailable only when stopping."""
        attempt = 0
        while True:
            try:
                work()
                return
            except DatabaseUnavailable as exc:
                attempt += 1
                if attempt == 1:
                    log.warning("database unavailable, %s until it is back error=%s", what, exc)
                if self._stopping.wait(min(DATABASE_RETRY_MAX_S, backoff_delay(attempt))):
                    raise
                if attempt > 1 and attempt % 10 == 0:
                    log.warning("database still unavailable attempts=%d error=%s", attempt, exc)

    def _run_job_once(self, job: Inbound | Republish) -> None:
        try:
            if isinstance(job, Republish):
                self._republish_desired(job.reason)
            else:
                self._handle(job)
        except DatabaseUnavailable:
            raise
        except Exception:
            if isinstance(job, Inbound):
                # The topic, not the job: the message is the device's and may be megabytes.
                self.counters.rejected(job.topic.kind.value, "handling_failed")
                log.exception("message handling failed device=%s topic=%s", job.topic.device_id, job.topic)
            else:
                log.exception("job failed job=%s", job)

    def _flush_seen(self) -> None:
        try:
            self.fleet.flush_seen()
        except ControllerError as exc:
            log.warning("last_seen times not written, kept for the next flush error=%s", exc)

    def _flush_counters(self) -> None:
        try:
            self.counters.flush(self.fleet.store)
        except ControllerError as exc:
            log.warning("message counters not written, kept for the next flush error=%s", exc)

    def _run_ingest(self) -> None:
        while True:
            job = self._telemetry_jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < MAX_INGEST_BATCH:
                try:
                    job = self._telemetry_jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._ingest(batch)
                    return
                batch.append(job)
            self._ingest(batch)

    def _ingest(self, batch: Sequence[Job]) -> None:
        """One transaction per batch, acknowledged once committed. While the database cannot be
        reached the batch waits, unacknowledged (the agents keep those windows), and is written
        when it is back."""
        jobs = [job for job in batch if isinstance(job, Inbound)]
        try:
            self._while_database_is_away(lambda: self._ingest_once(jobs), "telemetry held unacknowledged")
        except DatabaseUnavailable:
            log.warning("telemetry not stored at stop, its agents send it again count=%d", len(jobs))

    def _ingest_once(self, jobs: Sequence[Inbound]) -> None:
        """Should a window fail, the batch is rolled back and written again with a savepoint per
        window, so a bad one spoils only itself."""
        store = self.telemetry.store
        stored = self._stored_windows
        stored.clear()
        # Device by device (each one's messages in arrival order): a batch locks the devices' rows
        # in one order, so ingest processes sharing a database never wait on each other in a cycle.
        jobs = sorted(jobs, key=lambda job: job.topic.device_id)
        try:
            # Made before the transaction: making a partition locks its table (controller.partitions).
            store.partitions.ensure(
                "telemetry", [j.received_at for j in jobs if j.topic.kind is Kind.TELEMETRY]
            )
            with store.transaction():
                windows = []
                seen_at: dict[str, float] = {}
                for job in jobs:
                    if job.topic.kind is not Kind.TELEMETRY:
                        self._handle(job)
                    elif self._admit(job, seen_at):
                        windows.append(job)
                # The batch's windows in one statement (controller.telemetry), which takes the
                # devices' locks in their order; then their last_seen in one statement.
                self.telemetry.ingest_many(
                    [
                        (j.topic.device_id, cast(fleet_pb2.Telemetry, j.message), j.received_at)
                        for j in windows
                    ]
                )
                self.fleet.touch_many(seen_at)
                stored.extend((j.topic.device_id, cast(fleet_pb2.Telemetry, j.message).seq) for j in windows)
            self._acknowledge_telemetry(stored)
            return
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.warning("telemetry batch retried window by window count=%d error=%s", len(jobs), exc)
        stored.clear()
        try:
            with store.transaction():
                for job in jobs:
                    try:
                        with store.transaction():
                            self._handle(job)
                    except DatabaseUnavailable:
                        raise
                    except Exception:
                        log.exception("telemetry dropped device=%s", job.topic.device_id)
            self._acknowledge_telemetry(stored)
        except DatabaseUnavailable:
            raise
        except Exception:
            log.exception("telemetry batch failed count=%d", len(jobs))

    def _acknowledge_telemetry(self, stored: Sequence[tuple[str, int]]) -> None:
        """Tell each device which of its windows are stored (committed, or stored before): until
        then its agent keeps them and sends them again, so no window is lost with a broker session."""
        self.windows_acknowledged += len(stored)
        seqs: dict[str, list[int]] = {}
        for device_id, seq in stored:
            seqs.setdefault(device_id, []).append(seq)
        for device_id, device_seqs in seqs.items():
            ack = fleet_pb2.TelemetryAck(device_id=device_id, seqs=device_seqs)
            self._publish(Topic(device_id, Kind.TELEMETRY_ACK), encode(ack), retain=False)

    def _republish_desired(self, reason: str) -> None:
        states = self.fleet.desired_states()
        for device_id, payload in states:
            self.publish_desired(device_id, payload)
        log.info("desired states republished count=%d reason=%s", len(states), reason)

    def _answer_desired_request(self, device_id: str, request: Message) -> None:
        """Publish the device's desired state from the database: the broker's retained copy
        may be gone (a restarted broker without persistence, a cluster node that never had it)."""
        assert isinstance(request, fleet_pb2.DesiredRequest)
        payload = self.fleet.desired_state(device_id)
        if payload is None:
            log.info("desired state requested, none assigned yet device=%s", device_id)
            return
        self.publish_desired(device_id, payload)
        log.info(
            "desired state sent on request device=%s applied_generation=%d",
            device_id,
            request.applied_generation,
        )

    def _admit(self, job: Inbound, seen_at: dict[str, float] | None = None) -> bool:
        """Whether the message is its device's to send (counted and logged when not); the device
        is seen, written now or, given ``seen_at``, noted there for the caller to write with
        others."""
        device_id, kind = job.topic.device_id, job.topic.kind
        if not self.fleet.is_known(device_id):
            self.counters.rejected(kind.value, "unknown_device")
            self._bad.warning(
                device_id, "message from unknown device ignored device=%s topic=%s", device_id, job.topic
            )
            return False
        claimed = getattr(job.message, "device_id", "")
        if claimed and claimed != device_id:
            self.counters.rejected(kind.value, "device_mismatch")
            self._bad.warning(
                device_id,
                "payload rejected device=%s topic=%s reason=payload names device %r",
                device_id,
                job.topic,
                clip(claimed, 64),
            )
            return False
        seen = not job.retained and not (kind is Kind.STATUS and not getattr(job.message, "online", True))
        if seen and kind is Kind.ARTIFACT_REQUEST:
            # Many a second while a device downloads: its last_seen is written at most once a second.
            self.fleet.note_seen(device_id, job.received_at)
        elif seen and seen_at is not None:
            seen_at[device_id] = max(seen_at.get(device_id, 0.0), job.received_at)
        elif seen:
            self.fleet.touch(device_id, job.received_at)
        return True

    def _handle(self, job: Inbound) -> None:
        device_id, kind = job.topic.device_id, job.topic.kind
        if not self._admit(job):
            return
        if kind is Kind.REPORTED:
            assert isinstance(job.message, fleet_pb2.ReportedState)
            recorded = self.fleet.record_reported(device_id, job.message, job.received_at)
            if not recorded.kept:
                self.counters.rejected(kind.value, "out_of_order")
            elif recorded.reissued is not None:
                self.publish_desired(device_id, recorded.reissued)
        elif kind is Kind.STATUS:
            assert isinstance(job.message, fleet_pb2.DeviceStatus)
            if not self.fleet.record_status(device_id, job.message, job.received_at):
                self.counters.rejected(kind.value, "out_of_order")
        elif kind is Kind.TELEMETRY:
            assert isinstance(job.message, fleet_pb2.Telemetry)
            self.telemetry.ingest_telemetry(device_id, job.message, job.received_at)
            self._stored_windows.append((device_id, job.message.seq))
        elif kind is Kind.EVENTS:
            assert isinstance(job.message, fleet_pb2.Event)
            self.events.ingest(device_id, job.message, job.received_at)
        elif kind is Kind.ARTIFACT_REQUEST:
            assert isinstance(job.message, artifact_pb2.ChunkRequest)
            self._serve_artifact(device_id, job.message)
        elif kind is Kind.DESIRED_REQUEST:
            self._answer_desired_request(device_id, job.message)
        elif kind is Kind.CAPTURE:
            assert isinstance(job.message, fleet_pb2.CaptureChunk)
            if self.capture_quota is not None and not self.capture_quota.admit(device_id, job.message):
                self.counters.rejected(kind.value, "quota")
                self._bad.warning(
                    device_id,
                    "capture chunk refused device=%s reason=captured data quota of %d bytes reached",
                    device_id,
                    self.capture_quota.quota,
                )
            elif self.on_capture is not None:
                self.on_capture(device_id, job.message, job.received_at)

    def _serve_artifact(self, device_id: str, request: artifact_pb2.ChunkRequest) -> None:
        """Serve an artifact the device was assigned, within its bytes-per-second budget.
        Chunks over the budget are not sent and not refused: the agent asks again for what
        is missing after its request timeout, and an error would fail its download."""
        reply_to = Topic(device_id, Kind.ARTIFACT_RESPONSE)
        digest = clip(request.digest, 64)

        def reply(response: artifact_pb2.ArtifactResponse) -> None:
            self._publish(reply_to, encode(response), retain=False)

        def refuse(code: str, reason: str) -> None:
            self.counters.rejected(Kind.ARTIFACT_REQUEST.value, code)
            self._bad.warning(
                device_id, "artifact request refused device=%s digest=%s reason=%s", device_id, digest, reason
            )
            reply(
                artifact_pb2.ArtifactResponse(error=artifact_pb2.ArtifactError(digest=digest, reason=reason))
            )

        # Asked before whether the file exists, so the answer says nothing about other devices' artifacts.
        if not self.fleet.may_fetch(device_id, request.digest):
            refuse("not_assigned", f"artifact {digest} is not assigned to device {device_id}")
            return
        if not self.artifacts.exists(request.digest):
            refuse("unknown_artifact", f"unknown artifact {digest!r}")
            return
        if request.listening:
            # Nothing is sent back: the broadcast starts once the wave's devices listen.
            if self.waves is None or not self.waves.listening(device_id, request.digest):
                log.info("device listens on no broadcast waiting device=%s digest=%s", device_id, digest)
            return
        try:
            manifest = self.artifacts.manifest(request.digest)
            if request.want_manifest:
                response = artifact_pb2.ArtifactResponse(manifest=manifest)
                if not self._spend_bytes(device_id, response.ByteSize(), 1):
                    return
                reply(response)
                self.counters.bytes_served(device_id, response.ByteSize())
                log.info("manifest sent device=%s digest=%s", device_id, digest)
            # A repeated index is served once: each costs the device's budget only once too.
            indices = list(dict.fromkeys(request.indices))
            count = chunk_count(manifest.size, manifest.chunk_size)
            for i, index in enumerate(indices[:MAX_INDICES_PER_REQUEST]):
                if not 0 <= index < count:
                    refuse("bad_index", f"artifact {digest} has no chunk {index} (it has {count})")
                    continue
                length = min(manifest.chunk_size, manifest.size - index * manifest.chunk_size)
                if not self._spend_bytes(device_id, length, len(indices[:MAX_INDICES_PER_REQUEST]) - i):
                    break
                try:
                    chunk = self.artifacts.read_chunk(request.digest, index)
                except ArtifactNotFound as exc:
                    refuse("unknown_artifact", str(exc))
                    continue
                reply(artifact_pb2.ArtifactResponse(chunk=chunk))
                self.counters.bytes_served(device_id, length)
            if len(indices) > MAX_INDICES_PER_REQUEST:
                refuse(
                    "too_many_indices",
                    f"at most {MAX_INDICES_PER_REQUEST} chunk indices per request, got {len(indices)}",
                )
            if indices:
                log.debug("chunks sent device=%s digest=%s count=%d", device_id, digest, len(indices))
        except (ControllerError, OSError) as exc:
            refuse("unreadable", f"cannot read artifact: {exc}")

    def _spend_bytes(self, device_id: str, size: int, withheld: int) -> bool:
        """Charge ``size`` bytes to the device's budget; False (counting the ``withheld``
        replies not sent) when it is spent."""
        if self._chunk_bytes.allow(device_id, size):
            return True
        self.counters.rejected(Kind.ARTIFACT_REQUEST.value, "rate_limited")
        self.counters.rate_limited(device_id, "chunk_bytes", withheld)
        self._bad.warning(
            device_id,
            "artifact replies over the device's byte rate held back device=%s withheld=%d bytes_per_s=%g",
            device_id,
            withheld,
            self._chunk_bytes.limit.rate,
        )
        return False


def _written_by_the_network_thread(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Registered only so that paho leaves every socket write to the network thread."""


def broker_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for the broker, or None for plain TCP. Unusable CA, certificate or key
    files are a ConfigError naming the file: init and serve check before anything starts."""
    tls = _broker_tls(settings)
    if tls is None:
        return None
    try:
        return tls.context()
    except TlsSetupError as exc:
        raise ConfigError(f"mqtt_tls_*: {exc}") from None


def _broker_tls(settings: Settings) -> BrokerTls | None:
    if settings.mqtt_tls_ca_file is None:
        return None
    return BrokerTls(
        str(settings.mqtt_tls_ca_file),
        str(settings.mqtt_tls_cert_file or ""),
        str(settings.mqtt_tls_key_file or ""),
    )
