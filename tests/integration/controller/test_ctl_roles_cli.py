"""`edgefleet controller serve --roles/--instance`, refused before anything starts when it cannot
work: a SQLite database is one controller process with every role; roles and instances are
checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ctl"
    done = run("controller", "init", "--data-dir", str(folder))
    assert done.returncode == 0, done.stderr
    return folder


def test_a_subset_of_roles_on_sqlite_is_refused_naming_the_way_out(data_dir: Path) -> None:
    done = run("controller", "serve", "--data-dir", str(data_dir), "--roles", "ingest", "--instance", "1")
    assert done.returncode == 1
    assert "--roles ingest needs a database shared by several controller processes" in done.stderr
    assert "leave --roles out" in done.stderr and "postgresql://" in done.stderr
    # Refused before the SQLite file was locked: the one controller can still start.
    assert not (data_dir / "controller.db.lock").exists() or _lock_is_free(data_dir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--roles", "ingest,worker"), "unknown role 'worker': choose among api, ingest, chunks, engine"),
        (("--roles", ","), "--roles needs at least one of"),
        (("--instance", "17"), "--instance must be between 1 and 16, not 17"),
        (("--instance", "0"), "--instance must be between 1 and 16, not 0"),
    ],
)
def test_bad_roles_and_instances_are_refused(data_dir: Path, args: tuple[str, ...], message: str) -> None:
    done = run("controller", "serve", "--data-dir", str(data_dir), *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def _lock_is_free(data_dir: Path) -> bool:
    import fcntl

    with (data_dir / "controller.db.lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
