"""Run the agent on a device clock that jumps: ``python -m tests.support.clockshift OFFSET_FILE ARGS...``.

The process's wall clock (``time.time``, ``time.time_ns``) is shifted by the seconds written
in OFFSET_FILE, read again at most every 0.1 s, as a clock set by hand or by NTP jumps; the
monotonic clock goes on untouched, as such a jump leaves it. ARGS go to the agent's CLI.
``datetime.now`` reads the clock in C and is not shifted: the agent reads it only to check
its TLS certificate's dates.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from agent.cli import main

REREAD_S = 0.1


class ShiftedClock:
    def __init__(self, offset_file: Path) -> None:
        self.offset_file = offset_file
        self.real_time = time.time
        self.offset = 0.0
        self.read_at = float("-inf")

    def shift(self) -> float:
        now = time.monotonic()
        if now - self.read_at >= REREAD_S:
            self.read_at = now
            # A file being rewritten keeps the last offset.
            with contextlib.suppress(OSError, ValueError):
                self.offset = float(self.offset_file.read_text() or 0)
        return self.offset

    def time(self) -> float:
        return self.real_time() + self.shift()

    def time_ns(self) -> int:
        return int(self.time() * 1e9)


if __name__ == "__main__":
    clock = ShiftedClock(Path(sys.argv[1]))
    time.time = clock.time
    time.time_ns = clock.time_ns
    sys.exit(main(sys.argv[2:]))
