"""A plain paho client for tests that publish or listen as a device or the controller."""

from __future__ import annotations

import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode


class Peer:
    def __init__(self, port: int, username: str, password: str, client_id: str | None = None) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{username}-peer",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        connected = threading.Event()
        result: list[ReasonCode] = []

        def on_connect(c: mqtt.Client, u: object, flags: object, rc: ReasonCode, p: object) -> None:
            result.append(rc)
            connected.set()

        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not connected.wait(10):
            self.client.loop_stop()
            raise TimeoutError(f"{username} could not connect to the broker")
        if result[0].is_failure:
            self.client.loop_stop()
            raise ConnectionError(f"broker refused {username}: {result[0]}")

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object
    ) -> None:
        with self._cond:
            self._acks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
        if self.on_message is not None:
            self.on_message(message)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """Publish with QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout=10):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self._acks.pop(info.mid)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: done.set()
        self.client.subscribe(topic, qos=1)
        if not done.wait(10):
            raise TimeoutError(f"no SUBACK for {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
