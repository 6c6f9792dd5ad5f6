"""Run ``edgefleet`` with the rollout engine on a clock a test moves:
``python tests/support/engine_clock.py OFFSET_FILE ARGS...``.

Only the engine's clock seam (``Rollouts.clock``, which device groups and maintenance windows
read too) is shifted, by the seconds written in OFFSET_FILE, read again at most every 0.1 s.
MQTT, telemetry, tokens and the audit log keep the real time, so a test can say "it is now
02:00 in Paris" to the maintenance windows without the rest of the controller noticing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from controller import service
from controller.cli import main

REREAD_S = 0.1


class OffsetClock:
    def __init__(self, offset_file: Path) -> None:
        self.offset_file = offset_file
        self.offset = 0.0
        self.read_at = float("-inf")

    def __call__(self) -> float:
        now = time.monotonic()
        if now - self.read_at >= REREAD_S:
            self.read_at = now
            # A file being rewritten reads badly: the last offset stands.
            with contextlib.suppress(OSError, ValueError):
                self.offset = float(self.offset_file.read_text() or 0)
        return time.time() + self.offset


def run(offset_file: Path, argv: list[str]) -> int:
    clock = OffsetClock(offset_file)
    build = service.Controller.__init__

    def with_clock(self: service.Controller, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        self.rollouts.clock = clock

    service.Controller.__init__ = with_clock  # type: ignore[method-assign]
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
