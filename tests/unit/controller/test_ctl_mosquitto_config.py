"""The Mosquitto that `controller init` writes is deploy/mosquitto's, with its own paths."""

from __future__ import annotations

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
    assert files.reload_command() == f"kill -HUP $(cat {files.pid_file})"
    assert files.start_command().endswith(f" -c {files.conf} -d")
