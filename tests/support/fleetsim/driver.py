"""One thread's network loop for thousands of paho clients, each its own broker connection.

paho runs a thread per client with ``loop_start``; ten thousand threads do not
fit on one machine, so a simulator process drives its clients through paho's
external-loop interface instead: the socket callbacks register each client's
socket with one epoll selector, readable sockets get ``loop_read``, writable
ones ``loop_write``, and every client gets ``loop_misc`` (keepalive) once a
second. Timers (a device's next planned step, its next telemetry window, its
next connection attempt) live in one heap.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
KEEPALIVE_CHECK_S = 1.0


@dataclass(eq=False)
class Peer:
    """One client in the loop and what to call after its socket had traffic or closed."""

    client: mqtt.Client
    on_activity: Callable[[], None]
    on_closed: Callable[[], None]
    sock: Any = None


class Driver:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.peers: list[Peer] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._closed: list[Peer] = []
        self._next_misc = 0.0

    def add(
        self, client: mqtt.Client, on_activity: Callable[[], None], on_closed: Callable[[], None]
    ) -> Peer:
        peer = Peer(client, on_activity, on_closed)

        def opened(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            peer.sock = sock
            self.selector.register(sock, READ, peer)

        def closed(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            if peer.sock is not None:
                self.selector.unregister(peer.sock)
                peer.sock = None
            self._closed.append(peer)

        def want_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            if peer.sock is not None:
                self.selector.modify(peer.sock, READ | WRITE, peer)

        def written(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            if peer.sock is not None:
                self.selector.modify(peer.sock, READ, peer)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = written
        self.peers.append(peer)
        return peer

    def watch(self, fileobj: Any, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` when ``fileobj`` (a pipe to the parent, say) has data."""
        self.selector.register(fileobj, READ, on_readable)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._order), action))

    def run_once(self, max_wait: float = 0.05) -> None:
        now = time.monotonic()
        wait = max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - now))
        active: dict[int, Peer] = {}
        for key, mask in self.selector.select(wait):
            target = key.data
            if not isinstance(target, Peer):
                target()
                continue
            if mask & READ:
                target.client.loop_read()
            if mask & WRITE and target.sock is not None:
                target.client.loop_write()
            active[id(target)] = target
        for peer in active.values():
            peer.on_activity()
        closed, self._closed = self._closed, []
        for peer in closed:
            peer.on_closed()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()
        if now >= self._next_misc:
            self._next_misc = now + KEEPALIVE_CHECK_S
            for peer in self.peers:
                if peer.sock is not None:
                    peer.client.loop_misc()
