"""`edgefleet controller init` on a host with no broker yet: it writes a ready-to-run
Mosquitto, prints the command that starts it, and the controller works with that broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import free_port, wait_for_port
from tests.support.controller_process import connect
from tests.support.localfleet import Controller

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def init(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, "controller", "init", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_command(stderr: str) -> str:
    """The one indented line init prints after "start it with:"."""
    lines = stderr.splitlines()
    after = lines[next(i for i, line in enumerate(lines) if line.endswith("start it with:")) + 1 :]
    return next(line.strip() for line in after if line.strip())


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[list[Path]]:
    """Pid files of the brokers a test starts with init's command; each is stopped after."""
    pid_files: list[Path] = []
    yield pid_files
    for pid_file in pid_files:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_init_writes_a_broker_that_starts_with_the_printed_command(
    tmp_path: Path, own_broker: list[Path]
) -> None:
    data_dir, port = tmp_path / "ctl", free_port()
    done = init(data_dir, "--broker-port", str(port))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1, "the token is the only line on stdout"
    folder = data_dir / "mosquitto"
    assert {p.name for p in folder.iterdir()} >= {"mosquitto.conf", "edgefleet.acl", "passwd"}
    # The broker not running yet is no problem: nothing to reload, it reads the file when it starts.
    assert "WARNING" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert f"edgefleet controller serve --data-dir {data_dir}" in done.stderr

    command = start_command(done.stderr)
    assert str(folder / "mosquitto.conf") in command
    own_broker.append(folder / "mosquitto.pid")
    subprocess.run(command, shell=True, check=True, timeout=30)
    wait_for_port(port)

    controller = Controller(data_dir, port, token=done.stdout.strip())
    controller.start()
    try:
        # The device's password reaches the running broker through the default reload
        # command, `kill -HUP "$(cat .../mosquitto.pid)"`, run through a shell.
        creds = controller.cli("devices", "register", "cam-1")
        connect(port, "cam-1", creds["mqtt_password"], "cam-1").close()
        assert any(d["device_id"] == "cam-1" for d in controller.cli("devices", "list"))
    finally:
        controller.stop()


def test_init_refused_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    data_dir = tmp_path / "ctl"
    done = init(data_dir, "--mosquitto-passwd-file", str(not_a_folder / "passwd"))
    assert done.returncode == 1 and "cannot write" in done.stderr and "Traceback" not in done.stderr
    assert not data_dir.exists()
    # A reload command that fails (no systemd here, broker not started) is only a warning.
    done = init(
        data_dir, "--broker-reload-command", "systemctl reload no-such-mosquitto", "--rollup-window-s", "5"
    )
    assert done.returncode == 0, done.stderr
    assert "no-such-mosquitto" in done.stderr and (data_dir / "controller.toml").exists()
    assert "rollup_window_s = 5\n" in (data_dir / "controller.toml").read_text()
