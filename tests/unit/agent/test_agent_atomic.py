from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.atomic import write_atomic


def test_write_atomic_replaces_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_atomic_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_atomic_large_payload(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    write_atomic(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data
