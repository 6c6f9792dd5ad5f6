from __future__ import annotations

import random

from agent.backoff import backoff_delay


def test_reconnect_backoff_is_jittered_and_capped() -> None:
    for attempt in (1, 3, 10, 50):
        delays = [backoff_delay(attempt) for _ in range(200)]
        assert all(0 <= d <= 1.5 ** min(10, attempt) for d in delays)
        assert len(set(delays)) > 100


def test_the_draw_is_injectable() -> None:
    assert backoff_delay(3, lambda low, high: high) == 1.5**3
    assert backoff_delay(500, lambda low, high: high) == 1.5**10
    assert backoff_delay(7, lambda low, high: low) == 0
    assert backoff_delay(4, random.Random(1).uniform) == backoff_delay(4, random.Random(1).uniform)
