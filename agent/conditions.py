"""Device conditions: what keeps the device from part of its work while it goes on serving.

A condition is *hit* where the fault shows (a download write refused for want of
space) and *cleared* where it is seen to be gone (free space came back). The
reported state lists the conditions that hold (``ReportedState.conditions``), each
with when it began and how many times it was hit since, so an operator sees why a
device does not converge without reading its log. Thread-safe: any thread that
writes to the disk may hit one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from edgefleet_proto import fleet_pb2

# A write to the data disk failed with ENOSPC or EDQUOT; downloads wait for space.
DISK_FULL = "disk_full"
# Desired states arrive that the device refuses (unsigned, another key, another device); it keeps
# following the last state it verified. Cleared by the next state it verifies.
DESIRED_REFUSED = "desired_refused"
# The accelerator the profile declares ([accelerator] in agent.toml) cannot be used: the
# runtime does not offer it or fell back; models run on the CPU (agent/accelerators.py).
ACCELERATOR_UNAVAILABLE = "accelerator_unavailable"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Condition:
    kind: str
    message: str
    since_ms: int
    count: int = 1

    def to_proto(self) -> fleet_pb2.DeviceCondition:
        return fleet_pb2.DeviceCondition(
            kind=self.kind, message=self.message, since_ms=self.since_ms, count=self.count
        )


class Conditions:
    def __init__(self, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._held: dict[str, Condition] = {}

    def hit(self, kind: str, message: str) -> bool:
        """Record the condition (again); True when it began with this hit."""
        with self._lock:
            current = self._held.get(kind)
            if current is None:
                self._held[kind] = Condition(kind, message, self._clock_ms())
                return True
            self._held[kind] = replace(current, message=message, count=current.count + 1)
            return False

    def clear(self, kind: str) -> Condition | None:
        """End the condition; returns it as it was, or None when it did not hold."""
        with self._lock:
            return self._held.pop(kind, None)

    def holds(self, kind: str) -> bool:
        with self._lock:
            return kind in self._held

    def active(self) -> tuple[Condition, ...]:
        with self._lock:
            return tuple(self._held[k] for k in sorted(self._held))
