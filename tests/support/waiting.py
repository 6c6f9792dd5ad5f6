"""Waiting for a condition on real processes: the one poll loop of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A wait that ran out: a failed assertion to pytest, a TimeoutError to code that waits on."""


def wait_until(
    check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what``
    and the last thing it returned. Wait for events (a count, a logged line), not for states
    that can flip back between two polls."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
