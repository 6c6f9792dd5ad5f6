"""The order an agent says things in, carried by its reported states and status messages.

Several controller ingest processes share a fleet's messages (an MQTT shared subscription),
and a broker hands one device's messages to them in turn, so the controller cannot take the
order it handles them in for the order they were said. Each message carries (session, seq):
the session is when this sayer started (ms since the epoch, so a restarted agent outranks
everything it said before) and seq counts within it. The controller keeps a message only if
it outranks the stored one.
"""

from __future__ import annotations

import itertools
import threading
import time

_lock = threading.Lock()
_last_session = 0


def new_session() -> int:
    """Now in ms, and above any session this process began before (two sayers of one device
    made within a millisecond, as a test's simulated fleet can, are still ordered)."""
    global _last_session
    with _lock:
        _last_session = max(int(time.time() * 1000), _last_session + 1)
        return _last_session


class SaidOrder:
    """One sayer's numbering: its session and a count, from 1, that only goes up."""

    def __init__(self) -> None:
        self.session = new_session()
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            return next(self._count)

    def pair(self) -> tuple[int, int]:
        """Two consecutive numbers: a connection's online status and its will (agent.link)."""
        with self._lock:
            return next(self._count), next(self._count)
