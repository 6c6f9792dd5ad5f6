"""Per-device rate limits: one token bucket per device for each limit.

A bucket holds at most ``burst`` tokens and gains ``rate`` a second; a message
(or a chunk of ``cost`` bytes) passes only if the bucket holds what it costs.
Over any span of ``t`` seconds a device therefore gets at most
``burst + rate * t`` through, whatever it sends. The clock is injected so tests
can drive it; buckets are kept for the most recently seen devices only (the
controller's own account can publish under any device id).

Messages that say what a device *is* (a reported state, its online status) are not
dropped over the limit like events: only the newest one counts, so :class:`NewestWins`
holds the newest one of each kind back until the device's bucket allows it, and drops
the ones it replaces.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

# Buckets kept in memory; the least recently used is forgotten (a forgotten
# device starts again with a full bucket).
MAX_BUCKETS = 100_000

T = TypeVar("T")


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    name: str
    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError(f"limit {self.name}: rate and burst must be positive")


@dataclass
class TokenBucket:
    limit: Limit
    tokens: float
    updated: float

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens if the bucket holds them; a cost above the burst passes
        only from a full bucket (and leaves it in debt), so it is never refused for good."""
        self.tokens = min(self.limit.burst, self.tokens + max(0.0, now - self.updated) * self.limit.rate)
        self.updated = now
        if self.tokens < min(cost, self.limit.burst):
            return False
        self.tokens -= cost
        return True


class DeviceBuckets:
    """One :class:`TokenBucket` per device for one limit; thread-safe."""

    def __init__(
        self, limit: Limit, clock: Callable[[], float] = time.monotonic, capacity: int = MAX_BUCKETS
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.capacity = capacity
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, device_id: str, cost: float = 1.0) -> bool:
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                bucket = self._buckets[device_id] = TokenBucket(self.limit, self.limit.burst, now)
                while len(self._buckets) > self.capacity:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(device_id)
            return bucket.take(cost, now)


class NewestWins(Generic[T]):
    """Snapshots over a device's rate, held back newest-first; thread-safe.

    :meth:`offer` lets a snapshot through while the device's bucket allows; otherwise it
    is held (replacing, and so dropping, the one held of the same device and kind) until
    :meth:`due` finds a token for it. A snapshot let through while an older one is held
    drops the older one too, so what is handled last is always the newest said.
    """

    def __init__(self, buckets: DeviceBuckets, capacity: int = MAX_BUCKETS) -> None:
        self.buckets = buckets
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, str], T] = OrderedDict()

    def offer(self, device_id: str, kind: str, item: T) -> tuple[bool, int]:
        """(whether ``item`` goes through now, how many held snapshots it dropped)."""
        key = (device_id, kind)
        with self._lock:
            dropped = int(self._held.pop(key, None) is not None)
            if self.buckets.allow(device_id):
                return True, dropped
            self._held[key] = item
            while len(self._held) > self.capacity:
                self._held.popitem(last=False)
                dropped += 1
            return False, dropped

    def due(self) -> list[T]:
        """The held snapshots whose device's bucket has a token now, oldest held first."""
        with self._lock:
            released = [key for key in self._held if self.buckets.allow(key[0])]
            return [self._held.pop(key) for key in released]

    def held(self) -> int:
        with self._lock:
            return len(self._held)
