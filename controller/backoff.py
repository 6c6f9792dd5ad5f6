"""The controller's one retry delay: jittered exponential backoff.

Used where the controller tries again: broker reconnects, refused subscriptions,
a database that went away, retraining webhooks. Jitter, because retries that fail
together would otherwise come back together: controller replicas reconnecting to a
restarted broker, or hammering a webhook that is recovering, on the same beat. A
delay drawn uniformly between 0 and the exponential bound ("full jitter", as aiomqtt
does) spreads them over the whole window.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# The bound grows by GROWTH per attempt up to GROWTH ** MAX_EXPONENT (about 58 s).
GROWTH = 1.5
MAX_EXPONENT = 10

# Draws a float between its two arguments: random.uniform, a seeded random.Random's
# uniform, or in a test a function that returns the low or the high end.
Uniform = Callable[[float, float], float]


def backoff_delay(attempt: int, rng: Uniform = random.uniform) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): ``rng(0, 1.5 ** min(10, attempt))``.

    A caller that wants a lower ceiling caps the result: ``min(cap_s, backoff_delay(n))``."""
    return rng(0, GROWTH ** min(MAX_EXPONENT, attempt))
