"""A full data disk, told apart from other write errors, and the wait for space to return.

A full disk is a condition of the device, not a fault of the model or the agent:
the write that hit it is dropped, the ``disk_full`` condition is reported, work
that writes waits, and the free space is looked at again with jittered backoff
until there is room for what waits plus a reserve left for the agent's own small
writes (state, telemetry). Then the condition clears and the waiting work goes on.
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.backoff import backoff_delay
from agent.conditions import DISK_FULL, Conditions
from agent.errors import DiskFull

log = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A disk full again this soon after space came back keeps the backoff it had: free space
# can look sufficient while writes still fail (a quota), and the agent must not spin.
SETTLED_S = 60.0


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


@contextmanager
def refused_for_space(what: str) -> Iterator[None]:
    """Turn a write's ENOSPC or EDQUOT into :class:`DiskFull` naming ``what`` was written."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"{what}: {exc.strerror or exc}") from None
        raise


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class FreeSpace:
    """Whether the data disk has room, polled with backoff while it has not."""

    def __init__(
        self,
        directory: Path,
        reserve_bytes: int,
        conditions: Conditions,
        clock: Callable[[], float] = time.monotonic,
        delay: Callable[[int], float] = backoff_delay,
        free: Callable[[Path], int] = _free_bytes,
    ) -> None:
        self.directory = Path(directory)
        self.reserve_bytes = reserve_bytes
        self.conditions = conditions
        self.clock = clock
        self.delay = delay
        self.free = free
        self.polls = 0
        self.next_poll = 0.0
        self.cleared_at = -math.inf

    @property
    def full(self) -> bool:
        return self.conditions.holds(DISK_FULL)

    def hit(self, message: str) -> None:
        """A write was refused for want of space: report it and look again after a backoff.

        Further refusals while the disk is full are counted but do not push the next look back.
        """
        if not self.conditions.hit(DISK_FULL, message):
            return
        if self.clock() - self.cleared_at >= SETTLED_S:
            self.polls = 0
        log.warning("disk full, downloads wait for free space dir=%s error=%s", self.directory, message)
        self._schedule()

    def room_for(self, need_bytes: int) -> tuple[bool, int]:
        """Whether ``need_bytes`` fit and leave the reserve free; and the free bytes seen."""
        try:
            free = self.free(self.directory)
        except OSError as exc:
            log.error("free space unknown dir=%s error=%s", self.directory, exc)
            return False, 0
        return free >= need_bytes + self.reserve_bytes, free

    def poll(self, need_bytes: int) -> bool:
        """While full: True (and the condition cleared) once ``need_bytes`` fit, at most once per backoff."""
        if not self.full:
            return True
        if self.clock() < self.next_poll:
            return False
        fits, free = self.room_for(need_bytes)
        if not fits:
            self._schedule()
            return False
        cleared = self.conditions.clear(DISK_FULL)
        self.cleared_at = self.clock()
        log.info(
            "disk space back, downloads resume dir=%s free=%d need=%d reserve=%d refused_writes=%d",
            self.directory,
            free,
            need_bytes,
            self.reserve_bytes,
            cleared.count if cleared else 0,
        )
        return True

    def _schedule(self) -> None:
        self.polls += 1
        self.next_poll = self.clock() + self.delay(self.polls)
