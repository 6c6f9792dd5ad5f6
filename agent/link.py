"""The device's MQTT session.

paho-mqtt 2.x runs the socket in its own thread. Callbacks never raise: inbound
payloads are decoded there with :mod:`edgefleet_proto.codec` and handed to the
service loop through a queue; a malformed one becomes :class:`Rejected`. Every
QoS 1 publish returns a :class:`Publication` whose PUBACK reason code is checked;
a refusal (Mosquitto's ACL answers 'Not authorized') is logged as an error.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.broker_tls import LastError, explain
from edgefleet_proto.codec import PayloadError, decode, decode_as, encode
from edgefleet_proto.topics import Kind, Topic, TopicError
from edgefleet_proto.wave import is_wave_topic
from google.protobuf.message import Message
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.backoff import backoff_delay
from agent.config import MqttConfig
from agent.said_order import SaidOrder
from agent.tls import broker_tls, certificate_problem, client_context

log = logging.getLogger(__name__)

SUBSCRIBED_KINDS = (Kind.DESIRED, Kind.ARTIFACT_RESPONSE, Kind.TELEMETRY_ACK)


@dataclass(frozen=True)
class Inbound:
    kind: Kind
    message: Message


@dataclass(frozen=True)
class Rejected:
    kind: Kind | None
    topic: str
    reason: str


@dataclass(frozen=True)
class LinkUp:
    pass


@dataclass(frozen=True)
class LinkDown:
    reason: str


@dataclass(frozen=True)
class WaveInbound:
    """A frame of a wave broadcast this agent listens to (agent.broadcast)."""

    topic: str
    frame: artifact_pb2.WaveFrame


LinkEvent = Inbound | Rejected | LinkUp | LinkDown | WaveInbound


class Publication:
    """The outcome of one QoS 1 publish, known once the broker answered."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.mid = -1
        self.ok = False
        self.reason = ""
        self._done = threading.Event()

    def resolve(self, ok: bool, reason: str) -> None:
        self.ok, self.reason = ok, reason
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


def now_ms() -> int:
    return int(time.time() * 1000)


class Link:
    def __init__(
        self,
        device_id: str,
        config: MqttConfig,
        inbox: queue.Queue[Any],
        agent_version: str,
    ) -> None:
        self.device_id = device_id
        self.config = config
        self.inbox = inbox
        self.agent_version = agent_version
        self._attempt = 0
        self._delay = 0.0
        self._offline_said = False
        # The brokers this agent may use, in order; the one in use is self._addresses[self._at].
        self._addresses = config.addresses()
        self._at = 0
        self._refused = False
        # Set by stop(): the disconnect that follows is ours, not a broker to move away from.
        self._stopping = False
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, Publication] = {}
        self._early: dict[int, tuple[bool, str]] = {}
        # SUBSCRIBE packets awaiting their SUBACK (mid -> topics), and refusals in a row: a broker
        # may refuse a subscription for a while (NATS while its JetStream elects leaders), and a
        # link missing one would never hear that topic again.
        self._subscribing: dict[int, list[str]] = {}
        self._refusals = 0
        # The wave broadcast topics to be subscribed to (Link.listen), at every connection too.
        self._waves: frozenset[str] = frozenset()
        # Orders this link's status messages (agent.said_order); numbered per connection.
        self._said = SaidOrder()
        self._online_seq = self._will_seq = 0
        protocol = mqtt.MQTTv5 if config.protocol == "v5" else mqtt.MQTTv311
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else True,
        )
        self._client.username_pw_set(config.username or device_id, config.password)
        self._tls = broker_tls(config)
        self._paho_errors = LastError()
        self._client.enable_logger(self._paho_errors.logger())
        if self._tls is not None:
            self._client.tls_set_context(client_context(self._tls))
        else:
            log.warning(
                "broker connection is unencrypted device=%s host=%s port=%s: plain TCP is for a broker on "
                "this device or a trusted local network; set [mqtt] tls_ca_file for TLS",
                device_id,
                config.host,
                config.port,
            )
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    def topic(self, kind: Kind) -> str:
        return str(Topic(self.device_id, kind))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _status(self, online: bool, seq: int) -> bytes:
        return encode(
            fleet_pb2.DeviceStatus(
                online=online,
                at_ms=now_ms(),
                agent_version=self.agent_version,
                session=self._said.session,
                seq=seq,
            )
        )

    def _arm_will(self) -> None:
        """Number the next connection's online status and will (set now, before it connects): the
        will outranks the online status it follows and is outranked by the next connection's."""
        self._online_seq, self._will_seq = self._said.pair()
        self._client.will_set(
            self.topic(Kind.STATUS), self._status(False, self._will_seq), qos=1, retain=True
        )

    def start(self, own_thread: bool = True) -> None:
        """Connect from paho's network thread. With ``own_thread`` false nothing connects yet:
        an external network loop calls :meth:`attempt`, then paho's ``loop_read``,
        ``loop_write`` and ``loop_misc`` on :attr:`client` (the fleet simulator drives
        thousands of links from one thread that way), and :meth:`attempt` again
        :attr:`retry_delay` seconds after the connection is lost."""
        self._stopping = False
        self._arm_will()
        self._set_delay()
        kwargs: dict[str, Any] = {}
        if self.config.protocol == "v5":
            kwargs["clean_start"] = True
        host, port = self._addresses[0]
        self._client.connect_async(host, port, self.config.keepalive_s, **kwargs)
        if own_thread:
            self._client.loop_start()

    @property
    def client(self) -> mqtt.Client:
        """The paho client, for an external network loop (see :meth:`start`)."""
        return self._client

    @property
    def stopping(self) -> bool:
        return self._stopping

    def attempt(self) -> bool:
        """One connection attempt of an externally driven link, as paho's own loop makes it."""
        try:
            self._client.reconnect()
        except OSError:
            self._on_connect_fail(self._client, None)
            return False
        return True

    @property
    def retry_delay(self) -> float:
        """Seconds to wait before the next connection attempt (what paho's own loop waits)."""
        return self._delay

    def say_offline(self) -> Publication:
        """Publish the offline status (retained): the first half of :meth:`stop`. An external
        network loop waits for its acknowledgement itself before calling :meth:`stop`; one not
        acknowledged would be sent again after the online status when the link next connects."""
        self._offline_said = True
        return self.publish(self.topic(Kind.STATUS), self._status(False, self._will_seq), retain=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline ourselves and disconnect cleanly, so the broker drops the last will."""
        if self.connected and not self._offline_said:
            self.say_offline().wait(timeout)
        self._stopping = True
        self._connected.clear()
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def address(self) -> tuple[str, int]:
        """The broker in use, or tried next."""
        return self._addresses[self._at]

    def _fail_over(self) -> None:
        """After a failed attempt, try the next broker of the list. The backoff grows per round
        over the whole list, so a dead first broker does not delay reaching a live second one."""
        if len(self._addresses) < 2:
            return
        self._at = (self._at + 1) % len(self._addresses)
        host, port = self._addresses[self._at]
        # paho's host/port setters refuse while its loop is between attempts (state
        # "connecting", no socket), which is exactly when the next attempt must go elsewhere;
        # its reconnect reads these two attributes, and nothing else holds the old address.
        self._client._host, self._client._port = host, port
        log.info("trying the next broker device=%s host=%s port=%s", self.device_id, host, port)

    def _set_delay(self) -> None:
        rounds = self._attempt // len(self._addresses)
        delay = backoff_delay(rounds) if self._attempt and rounds else (0.2 if self._attempt else 0.0)
        self._delay = delay
        # paho accepts float seconds; its annotation says int.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Publication:
        pub = Publication(topic)
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            pub.mid = info.mid
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = pub
        if early is not None:
            pub.resolve(*early)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued at all: nothing will ever acknowledge it.
            with self._lock:
                self._pending.pop(info.mid, None)
            pub.resolve(False, mqtt.error_string(info.rc))
            log.error("publish failed device=%s topic=%s error=%s", self.device_id, topic, pub.reason)
        return pub

    # -- paho callbacks: run in paho's thread and must never raise ------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self._attempt += 1
                # paho may follow with on_disconnect: that one must not skip a broker.
                self._refused = True
                self._fail_over()
                self._arm_will()
                self._set_delay()
                log.error("broker refused connection device=%s reason=%s", self.device_id, reason_code)
                return
            self._attempt = 0
            self._set_delay()
            self._refusals = 0
            with self._lock:
                waves = sorted(self._waves)
            self._subscribe([self.topic(k) for k in SUBSCRIBED_KINDS] + waves)
            self._offline_said = False
            self.publish(self.topic(Kind.STATUS), self._status(True, self._online_seq), retain=True)
            self._connected.set()
            log.info(
                "broker connected device=%s host=%s port=%s",
                self.device_id,
                *self.address,
            )
            self.inbox.put(LinkUp())
        except Exception:
            log.exception("on_connect failed device=%s", self.device_id)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            self._attempt += 1
            failed = self.address
            self._fail_over()
            self._arm_will()
            self._set_delay()
            # paho calls this from the `except OSError` around its connect: the error is current.
            error = sys.exc_info()[1]
            log.warning(
                "broker connection failed device=%s host=%s port=%s attempt=%d reason=%s",
                self.device_id,
                *failed,
                self._attempt,
                self._reason(error) if error is not None else "unknown",
            )
        except Exception:
            log.exception("on_connect_fail failed device=%s", self.device_id)

    def _reason(self, error: BaseException | str) -> str:
        return explain(error, self._tls, self.address[0], certificate_problem)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was = self._connected.is_set()
            self._connected.clear()
            if self._stopping:
                return
            self._attempt += 1
            failed = self.address
            if not was and not self._refused:
                self._fail_over()
            self._refused = False
            self._arm_will()
            self._set_delay()
            paho_error = self._paho_errors.take()
            if was:
                log.warning("broker disconnected device=%s reason=%s", self.device_id, reason_code)
                self.inbox.put(LinkDown(str(reason_code)))
            elif paho_error:
                # Ended before CONNACK: under TLS 1.3 this is how a refused client certificate shows.
                log.warning(
                    "broker connection failed device=%s host=%s port=%s attempt=%d reason=%s",
                    self.device_id,
                    *failed,
                    self._attempt,
                    self._reason(paho_error),
                )
        except Exception:
            log.exception("on_disconnect failed device=%s", self.device_id)

    def _subscribe(self, topics: list[str]) -> None:
        with self._lock:
            _, mid = self._client.subscribe([(topic, 1) for topic in topics])
            if mid is not None:
                self._subscribing[mid] = topics

    def _subscribe_again(self, topics: list[str]) -> None:
        """Timer thread: ask again for what the broker refused, on the link of the moment (a link
        that went down in between subscribes to everything when it comes back)."""
        try:
            if self.connected:
                log.info("subscribing again device=%s topics=%s", self.device_id, ",".join(topics))
                self._subscribe(topics)
        except Exception:
            log.exception("subscribing again failed device=%s", self.device_id)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            with self._lock:
                topics = self._subscribing.pop(mid, [])
            refused = [t for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
            for topic, rc in zip(topics, reason_codes, strict=False):
                if rc.is_failure:
                    log.error("subscription refused device=%s topic=%s reason=%s", self.device_id, topic, rc)
            if refused:
                self._refusals += 1
                timer = threading.Timer(backoff_delay(self._refusals), self._subscribe_again, args=(refused,))
                timer.daemon = True
                timer.start()
            elif self._refusals:
                # Everything this link reads is subscribed only now: what it asks for at every
                # connection (its desired state, missing chunks, unacknowledged telemetry) again.
                self._refusals = 0
                log.info("subscriptions complete device=%s", self.device_id)
                self.inbox.put(LinkUp())
        except Exception:
            log.exception("on_subscribe failed device=%s", self.device_id)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            ok = not reason_code.is_failure
            reason = str(reason_code)
            with self._lock:
                pub = self._pending.pop(mid, None)
                if pub is None:
                    self._early[mid] = (ok, reason)
            if not ok:
                log.error(
                    "publish refused by broker device=%s topic=%s reason=%s",
                    self.device_id,
                    pub.topic if pub else "?",
                    reason,
                )
            if pub is not None:
                pub.resolve(ok, reason)
        except Exception:
            log.exception("on_publish failed device=%s", self.device_id)

    def listen(self, topics: frozenset[str]) -> None:
        """Be subscribed to exactly these wave broadcast topics, now and at every connection."""
        with self._lock:
            added, dropped = sorted(topics - self._waves), sorted(self._waves - topics)
            self._waves = frozenset(topics)
        if not self.connected:
            return
        if added:
            self._subscribe(added)
        if dropped:
            self._client.unsubscribe(dropped)

    def _on_wave(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            wanted = msg.topic in self._waves
        # Frames in flight when the agent stopped listening, and the empty payload that clears a
        # wave's retained announcement, are nothing to act on.
        if not wanted or not msg.payload:
            return
        try:
            frame = decode_as(artifact_pb2.WaveFrame, bytes(msg.payload))
        except PayloadError as exc:
            log.warning("payload rejected device=%s topic=%s error=%s", self.device_id, msg.topic, exc)
            self.inbox.put(Rejected(None, msg.topic, str(exc)))
            return
        self.inbox.put(WaveInbound(msg.topic, frame))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if is_wave_topic(msg.topic):
                self._on_wave(msg)
                return
            try:
                topic = Topic.parse(msg.topic)
            except (TopicError, UnicodeDecodeError) as exc:
                self.inbox.put(Rejected(None, str(msg.topic), str(exc)))
                return
            if topic.device_id != self.device_id or topic.kind not in SUBSCRIBED_KINDS:
                self.inbox.put(Rejected(topic.kind, msg.topic, "not a topic this agent reads"))
                return
            try:
                message = decode(topic.kind, bytes(msg.payload))
            except PayloadError as exc:
                log.warning("payload rejected device=%s topic=%s error=%s", self.device_id, msg.topic, exc)
                self.inbox.put(Rejected(topic.kind, msg.topic, str(exc)))
                return
            self.inbox.put(Inbound(topic.kind, message))
        except Exception:
            log.exception("on_message failed device=%s topic=%s", self.device_id, msg.topic)
