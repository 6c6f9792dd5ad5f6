"""The Mosquitto that `controller init` writes is deploy/mosquitto's, with its own paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from controller.mosquitto_config import ACL, DIRECTIVES, BrokerFiles

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto"
MOVED = ("listener", "password_file", "acl_file", "persistence_location")


def _directives(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and line.split()[0] not in MOVED]


def test_directives_and_acl_are_the_deploy_files() -> None:
    assert _directives((DEPLOY / "edgefleet.conf").read_text()) == _directives(DIRECTIVES)
    assert (DEPLOY / "edgefleet.acl").read_text() == ACL


def test_conf_keeps_a_loopback_broker_on_loopback(tmp_path: Path) -> None:
    files = BrokerFiles(tmp_path / "mosquitto")
    local = files.render_conf(1884, "127.0.0.1", files.passwd)
    assert "listener 1884 127.0.0.1\n" in local and f"password_file {files.passwd}\n" in local
    assert f"pid_file {files.pid_file}\n" in local and f"acl_file {files.acl}\n" in local
    assert "listener 1883\n" in files.render_conf(1883, "broker.example.net", files.passwd)
    assert files.start_command().endswith(f" -c {files.conf} -d")


def test_reload_signals_the_running_broker_and_is_nothing_before_it_started(tmp_path: Path) -> None:
    files = BrokerFiles(tmp_path / "mosquitto")
    files.folder.mkdir()
    not_started = subprocess.run(["/bin/sh", "-c", files.reload_command()], capture_output=True, text=True)
    assert (not_started.returncode, not_started.stderr) == (0, "")
    # Stands in for the daemon: it answers SIGHUP itself (a test runner started under nohup
    # would pass an ignored SIGHUP on to a plain `sleep`), once it says it is listening.
    waits = "import signal, sys, time; signal.signal(signal.SIGHUP, lambda *a: sys.exit(7)); print('ready', flush=True); time.sleep(60)"
    broker = subprocess.Popen([sys.executable, "-c", waits], stdout=subprocess.PIPE, text=True)
    try:
        assert broker.stdout is not None and broker.stdout.readline().strip() == "ready"
        files.pid_file.write_text(f"{broker.pid}\n")
        subprocess.run(["/bin/sh", "-c", files.reload_command()], check=True)
        assert broker.wait(timeout=30) == 7
    finally:
        broker.kill()
