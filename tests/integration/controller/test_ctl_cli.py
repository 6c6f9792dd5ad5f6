"""`edgefleet controller init/serve` and the operator commands, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.broker import Broker, free_port
from tests.support.controller_process import connect
from tests.support.waiting import wait_until

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=120)


class Server:
    def __init__(self, data_dir: Path, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / "serve.log"
        self.env = {**os.environ, "EDGEFLEET_URL": self.url, "EDGEFLEET_TOKEN": token}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [EDGEFLEET, "controller", "serve", "--data-dir", str(data_dir), "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"controller exited: {self.log.read_text()}")
        return "controller ready url=" in self.log.read_text()

    def cli(self, *args: str) -> Any:
        done = run("--json", *args, env=self.env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def initialised(broker: Broker, tmp_path: Path) -> tuple[Path, str]:
    data_dir = tmp_path / "ctl"
    done = run(
        "controller", "init", "--data-dir", str(data_dir),
        "--broker-port", str(broker.port),
        "--mosquitto-passwd-file", str(broker.passwd_file),
        "--broker-reload-command", broker.reload_command,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) >= 40, "the token is the only line on stdout"
    return data_dir, lines[0]


@pytest.fixture
def server(initialised: tuple[Path, str]) -> Iterator[Server]:
    s = Server(*initialised)
    try:
        wait_until(s.ready, 30, "controller ready")
        yield s
    finally:
        s.stop()


def test_init_creates_the_data_folder_once(broker: Broker, initialised: tuple[Path, str]) -> None:
    data_dir, token = initialised
    assert (data_dir / "controller.db").exists() and (data_dir / "artifacts").is_dir()
    settings = tomllib.loads((data_dir / "controller.toml").read_text())
    assert token not in (data_dir / "controller.toml").read_text()
    assert broker.passwd_file.read_text().startswith("edgefleet-controller:$7$101$")
    # The password file and the reload worked: the controller's own user can log in.
    connect(broker.port, "edgefleet-controller", settings["mqtt_password"], "cli-test").close()
    again = run("controller", "init", "--data-dir", str(data_dir))
    assert again.returncode == 1 and "already initialised" in again.stderr and again.stdout == ""
    rotated = run("controller", "init", "--data-dir", str(data_dir), "--rotate-token")
    assert rotated.returncode == 0 and rotated.stdout.strip() not in ("", token)
    assert (
        tomllib.loads((data_dir / "controller.toml").read_text())["mqtt_password"]
        == settings["mqtt_password"]
    )


def test_operator_commands_over_rest(server: Server, broker: Broker, tmp_path: Path) -> None:
    from tests.support.models import digits_classifier

    model = digits_classifier(tmp_path / "digits.onnx").path
    version = server.cli(
        "models", "upload", str(model), "--name", "digits", "--version", "1", "--metadata", '{"a": 1}'
    )
    assert version["metadata"] == {"a": 1} and version["format"] == "onnx"
    assert server.cli("models", "list")[0]["versions"][0]["digest"] == version["digest"]

    config = tmp_path / "agent.toml"
    creds = server.cli(
        "devices", "register", "cam-1", "--tag", "lobby",
        "--agent-config", str(config), "--agent-data-dir", str(tmp_path / "agent"),
    )  # fmt: skip
    agent = tomllib.loads(config.read_text())
    assert agent["device_id"] == "cam-1" and agent["data_dir"] == str(tmp_path / "agent")
    assert agent["mqtt"] == {
        "host": "127.0.0.1",
        "port": broker.port,
        "username": "cam-1",
        "password": creds["mqtt_password"],
        "protocol": "v5",
    }
    assert config.stat().st_mode & 0o777 == 0o600
    connect(broker.port, "cam-1", creds["mqtt_password"], "cam-1-cli-test").close()
    assert server.cli("devices", "list")[0]["tags"] == ["lobby"]

    created = server.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "cam-1")
    assert created["status"] == "in_progress"
    assert server.cli("rollouts", "show", created["id"])["devices"][0]["device_id"] == "cam-1"
    assert server.cli("telemetry", "cam-1", "--limit", "5") == []
    assert server.cli("events", "cam-1") == []

    # Errors: the API's message on stderr, exit 1, nothing on stdout.
    missing = run(
        "rollouts", "create", "--model", "digits", "--version", "9", "--device", "ghost", env=server.env
    )
    assert missing.returncode == 1 and missing.stdout == ""
    assert "unknown model version digits 9" in missing.stderr and "ghost" in missing.stderr
    denied = run("--token", "wrong", "models", "list", env=server.env)
    assert denied.returncode == 1 and "401" in denied.stderr and "bearer token" in denied.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    refused = run("models", "upload", str(junk), "--name", "junk", "--version", "1", env=server.env)
    assert refused.returncode == 1 and "onnx" in refused.stderr
    unreachable = run("--url", f"http://127.0.0.1:{free_port()}", "models", "list", env=server.env)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200


def test_rotated_token_takes_effect_without_a_restart(server: Server, initialised: tuple[Path, str]) -> None:
    data_dir, old = initialised
    assert server.cli("models", "list") == []
    rotated = run("controller", "init", "--data-dir", str(data_dir), "--rotate-token")
    new = rotated.stdout.strip()
    assert run("--token", old, "models", "list", env=server.env).returncode == 1
    assert run("--token", new, "models", "list", env=server.env).returncode == 0


@pytest.mark.slow
def test_models_upload_with_samples_and_the_signature_commands(
    server: Server, tmp_path: Path, real_models: Callable[[str], Path]
) -> None:
    import numpy as np

    from tests.support.realmodels import sample_inputs

    model = real_models("silero_vad")
    refused = run("models", "upload", str(model), "--name", "vad", "--version", "1", env=server.env)
    assert refused.returncode == 1 and "Pad reflect requires axis length >= 2" in refused.stderr
    samples = tmp_path / "vad.npz"
    np.savez(samples, **sample_inputs("silero_vad", 4))  # type: ignore[arg-type]
    version = server.cli(
        "models", "upload", str(model), "--name", "vad", "--version", "1", "--samples", str(samples)
    )
    assert (version["sample_origin"], version["sample_count"]) == ("uploaded", 4)
    shown = run("models", "show", "vad", "1", env=server.env)
    assert shown.returncode == 0 and "state: from stateN" in shown.stdout
    signature = server.cli("models", "signature", "vad", "1")
    signature["inputs"][2]["value"] = [16000]
    edited = tmp_path / "signature.json"
    edited.write_text(json.dumps(signature))
    assert server.cli("models", "signature", "vad", "1", "--set", str(edited))["inputs"][2]["value"] == [
        16000.0
    ]
    signature["inputs"][2]["dtype"] = "float32"
    edited.write_text(json.dumps(signature))
    wrong = run("models", "signature", "vad", "1", "--set", str(edited), env=server.env)
    assert wrong.returncode == 1 and "input 'sr': dtype float32 does not match" in wrong.stderr
