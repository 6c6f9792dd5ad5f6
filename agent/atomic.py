"""Crash-safe file replacement: every state file of the agent is written here."""

from __future__ import annotations

import fnmatch
import os
import signal
from pathlib import Path

# Power-loss tests set this to "<file name pattern>:<step>" (e.g. "state.json:renamed") to
# SIGKILL the agent at that step of a matching write, as a power cut would stop it there.
# Unset (always, outside those tests) it costs one environment lookup per write.
CRASH_AT_ENV = "EDGEFLEET_AGENT_CRASH_AT_WRITE"
# The steps of write_atomic in order; move_atomic has the last two.
WRITE_STEPS = ("partial", "written", "synced", "renamed", "dir_synced")


def _crash_point(path: Path, step: str) -> None:
    spec = os.environ.get(CRASH_AT_ENV)
    if spec:
        pattern, _, at = spec.rpartition(":")
        if at == step and fnmatch.fnmatchcase(path.name, pattern):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary file lives in the same directory (rename is only atomic within
    one file system), is fsynced before the rename, and the directory is fsynced
    after it so the rename itself survives a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        half = len(view) // 2
        _write_all(fd, view[:half])
        _crash_point(path, "partial")
        _write_all(fd, view[half:])
        _crash_point(path, "written")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    _crash_point(path, "synced")
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _crash_point(path, "renamed")
    fsync_dir(path.parent)
    _crash_point(path, "dir_synced")


def move_atomic(src: Path, dst: Path) -> None:
    """Rename a fully written and fsynced file into place and persist the rename."""
    os.replace(src, dst)
    _crash_point(Path(dst), "renamed")
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
    _crash_point(Path(dst), "dir_synced")
