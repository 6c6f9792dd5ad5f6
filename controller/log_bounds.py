"""Log lines that carry what a device sent stay short and few.

A device chooses its payloads, so a string from one (a model name, an event
message, a device id it claims) is cut to :data:`MAX_FIELD_CHARS` and its
control characters escaped (no forged second line) by :func:`clip`. Warnings
about a device's bad messages go through :class:`BadMessageLog`, which lets at
most a few a second through per device and reports how many it held back on
the next line it lets through. Each kind of line (its format) has its own
budget, so a flood of one problem does not hide another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from controller.rate_limits import DeviceBuckets, Limit

MAX_FIELD_CHARS = 200
# A whole line built from clipped fields is cut here too.
MAX_LINE_CHARS = 2000
BAD_MESSAGE_LOG_BURST = 10
# Devices (and kinds of line) whose held-back lines are counted: the controller's account can use any id.
MAX_HELD_KEYS = 10_000


def clip(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """``value`` as text of at most about ``limit`` characters, control characters escaped."""
    text = str(value)
    head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])[:limit]
    if len(text) > limit:
        return f"{head}...(+{len(text) - limit} chars)"
    return head


def bounded_line(fmt: str, *args: object) -> str:
    """``fmt % args`` with every string argument clipped and the line cut to :data:`MAX_LINE_CHARS`."""
    safe = tuple(a if isinstance(a, int | float) else clip(a) for a in args)
    return clip(fmt % safe, MAX_LINE_CHARS)


class BadMessageLog:
    """Warnings about bad messages, rate-limited per device and kind of line."""

    def __init__(
        self,
        logger: logging.Logger,
        per_s: float,
        burst: int = BAD_MESSAGE_LOG_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._buckets = DeviceBuckets(Limit("bad_message_log", per_s, burst), clock)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def warning(self, device_id: str, fmt: str, *args: object) -> bool:
        """Log one bounded line unless this device's budget is spent; True if logged."""
        return self.log(logging.WARNING, device_id, fmt, *args)

    def log(self, level: int, device_id: str, fmt: str, *args: object) -> bool:
        key = f"{device_id}\0{fmt}"
        allowed = self._buckets.allow(key)
        with self._lock:
            if not allowed:
                if key not in self._held and len(self._held) >= MAX_HELD_KEYS:
                    return False
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
        line = bounded_line(fmt, *args)
        if held:
            line = f"{line} (held back {held} similar lines)"
        self.logger.log(level, "%s", line)
        return True


class LineBound(logging.Filter):
    """Cuts any record's message to :data:`MAX_LINE_CHARS`: a safety net on the controller's
    log handlers for lines that carry a device's strings without going through :func:`clip`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LINE_CHARS:
            record.msg, record.args = clip(message, MAX_LINE_CHARS), None
        return True
