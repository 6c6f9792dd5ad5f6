from __future__ import annotations

from controller.backoff import backoff_delay


def test_backoff_is_jittered_and_capped() -> None:
    def top(low: float, high: float) -> float:
        return high

    def bottom(low: float, high: float) -> float:
        return low

    assert backoff_delay(1, top) == 1.5
    assert backoff_delay(3, top) == 1.5**3
    assert backoff_delay(10, top) == backoff_delay(500, top) == 1.5**10
    assert backoff_delay(7, bottom) == 0
    assert all(0 <= backoff_delay(4) <= 1.5**4 for _ in range(100))
