"""A TCP relay between one MQTT client (the controller) and the broker, for tests and benchmarks.

It counts the bytes the client sends (its egress) and may rewrite the payload of each
PUBLISH the client sends, as a fault on the wire would: the packets are parsed (MQTT
3.1.1 or 5, told by the client's CONNECT), the payload is replaced and the packet framed
again. Everything else passes through untouched, in both directions.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress

from tests.support.broker import free_port

# (topic, payload) -> the payload the broker gets.
Tamper = Callable[[str, bytes], bytes]

CONNECT, PUBLISH = 1, 3


def _remaining_length(buf: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, bytes it took) of the variable-length integer at ``at``; None when incomplete."""
    value = shift = 0
    for i in range(4):
        if at + i >= len(buf):
            return None
        byte = buf[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("malformed MQTT remaining length")


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Relay:
    def __init__(self, upstream_port: int, tamper: Tamper | None = None) -> None:
        self.upstream_port = upstream_port
        self.tamper = tamper
        self.port = free_port()
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> int:
        """The bytes the client sent since the last call."""
        with self._lock:
            sent, self.sent = self.sent, 0
            return sent

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            outbound = self._rewrite if self.tamper is not None else self._raw
            threading.Thread(target=outbound, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n

    def _raw(self, src: socket.socket, dst: socket.socket) -> None:
        self._pump(src, dst, count=True)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool = False) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _rewrite(self, src: socket.socket, dst: socket.socket) -> None:
        """Client to broker, packet by packet, each PUBLISH's payload through ``tamper``."""
        assert self.tamper is not None
        buf = bytearray()
        v5 = False
        try:
            while data := src.recv(1 << 16):
                buf += data
                while len(buf) >= 2:
                    parsed = _remaining_length(buf, 1)
                    if parsed is None:
                        break
                    length, size = parsed
                    end = 1 + size + length
                    if len(buf) < end:
                        break
                    kind, flags, body = buf[0] >> 4, buf[0] & 0x0F, bytes(buf[1 + size : end])
                    del buf[:end]
                    if kind == CONNECT:
                        # Protocol name (2-byte length + "MQTT"), then the level: 5 for MQTT 5.
                        v5 = body[2 + int.from_bytes(body[:2], "big")] == 5
                    if kind == PUBLISH:
                        body = self._publish(flags, body, v5)
                    packet = bytes([(kind << 4) | flags]) + _encode_length(len(body)) + body
                    dst.sendall(packet)
                    self._count(len(packet))
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _publish(self, flags: int, body: bytes, v5: bool) -> bytes:
        assert self.tamper is not None
        at = 2 + int.from_bytes(body[:2], "big")
        topic = body[2:at].decode()
        if (flags >> 1) & 3:
            at += 2
        if v5:
            parsed = _remaining_length(body, at)
            assert parsed is not None
            at += parsed[1] + parsed[0]
        return body[:at] + self.tamper(topic, body[at:])


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
