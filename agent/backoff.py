"""The agent's one retry delay: jittered exponential backoff.

Every retry loop of the agent (broker reconnects, refused subscriptions, refused
outbox records, failing sensor sources, a full disk) waits this long. Jitter,
because a fleet that lost its broker together would otherwise come back together:
thousands of devices reconnecting and resending on the same beat. A delay drawn
uniformly between 0 and the exponential bound ("full jitter", as aiomqtt does)
spreads them over the whole window.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# The bound grows by GROWTH per attempt up to GROWTH ** MAX_EXPONENT (about 58 s).
GROWTH = 1.5
MAX_EXPONENT = 10

# Draws a float between its two arguments: random.uniform, or a seeded random.Random's uniform.
Uniform = Callable[[float, float], float]


def backoff_delay(attempt: int, rng: Uniform = random.uniform) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): uniform in [0, 1.5 ** min(10, attempt)]."""
    return rng(0, GROWTH ** min(MAX_EXPONENT, attempt))
