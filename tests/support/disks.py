"""Real full disks for tests: a small tmpfs mounted over a folder, and a file that fills it."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(path: Path, size_mb: float) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mb`` over ``path`` (skips the test without root, as outside CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full disk needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    size_kb = int(size_mb * 1024)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazily: a process under test may still hold files open.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses another byte; returns it (remove it to free the space)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb", buffering=0) as f:
        for block in (b"\xa5" * 4096, b"\xa5"):
            try:
                while True:
                    f.write(block)
            except OSError as exc:
                assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc
    assert os.statvfs(disk).f_bavail == 0
    return filler


class KeepFull:
    """Another program writing to the disk: whatever space is freed, it takes again at once."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.files: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KeepFull:
        self.files.append(fill(self.disk))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for f in self.files:
            f.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            if os.statvfs(self.disk).f_bavail > 0:
                self.files.append(fill(self.disk))
