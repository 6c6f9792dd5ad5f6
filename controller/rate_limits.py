"""Per-device rate limits: one token bucket per device for each limit.

A bucket holds at most ``burst`` tokens and gains ``rate`` a second; a message
(or a chunk of ``cost`` bytes) passes only if the bucket holds what it costs.
Over any span of ``t`` seconds a device therefore gets at most
``burst + rate * t`` through, whatever it sends. The clock is injected so tests
can drive it; buckets are kept for the most recently seen devices only (the
controller's own account can publish under any device id).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Buckets kept in memory; the least recently used is forgotten (a forgotten
# device starts again with a full bucket).
MAX_BUCKETS = 100_000


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
