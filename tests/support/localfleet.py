"""A whole EdgeFleet on this machine: a controller process and agent processes.

Used by the end-to-end tests, the demo (examples/demo.py) and the benchmarks, so
all three drive the product exactly as an operator and a device would: the
`edgefleet` and `edgefleet-agent` console scripts, the REST API, MQTT and the
agents' gRPC sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.agent_process import AgentProcess
from tests.support.broker import free_port
from tests.support.waiting import wait_until

BIN = Path(sys.executable).parent


def _log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@dataclass
class Controller:
    data_dir: Path
    broker_port: int
    passwd_file: Path | None = None
    reload_command: str | None = None
    protocol: str = "v5"
    port: int = field(default_factory=free_port)
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    # What runs ``edgefleet controller serve``: the console script, or a wrapper taking the same
    # arguments (tests/support/engine_clock.py runs the engine on a clock the test moves).
    serve: tuple[str, ...] = (str(BIN / "edgefleet"),)
    # ``serve --roles`` and ``--instance`` (controller.roles): one of several processes sharing the
    # data folder and its PostgreSQL database; "" is every role. Without api it serves no HTTP.
    roles: str = ""
    instance: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        suffix = f"-{self.instance}" if self.instance is not None else ""
        return self.data_dir.parent / f"{self.data_dir.name}{suffix}.log"

    @property
    def serves_http(self) -> bool:
        return not self.roles or "api" in self.roles.split(",")

    def role_process(self, roles: str, instance: int | None = None) -> Controller:
        """Another process of this controller (same data folder and token) with these roles."""
        return Controller(
            self.data_dir, self.broker_port, self.passwd_file, self.reload_command, self.protocol,
            token=self.token, serve=self.serve, roles=roles, instance=instance,
        )  # fmt: skip

    def init(self, *extra: str) -> str:
        args = [
            str(BIN / "edgefleet"), "controller", "init", "--data-dir", str(self.data_dir),
            "--broker-host", "127.0.0.1", "--broker-port", str(self.broker_port),
            "--mqtt-protocol", self.protocol, *extra,
        ]  # fmt: skip
        if self.passwd_file is not None:
            args += ["--mosquitto-passwd-file", str(self.passwd_file)]
        if self.reload_command is not None:
            args += ["--broker-reload-command", self.reload_command]
        out = subprocess.run(args, check=True, capture_output=True, text=True)
        self.token = out.stdout.strip().splitlines()[-1]
        return self.token

    def start(self) -> Controller:
        if not self.token:
            self.init()
        roles = ["--roles", self.roles] if self.roles else []
        roles += ["--instance", str(self.instance)] if self.instance is not None else []
        logged = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.serve, "controller", "serve", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), *roles],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        # Generous: on two cores shared with other test processes, starting takes 10-30 s.
        try:
            if self.serves_http:
                wait_until(self._answers, 120, f"controller on {self.url}")
            else:
                wait_until(lambda: self._logged("controller ready", logged), 120, f"controller {self.roles}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; log:\n{_log_tail(self.log_file)}") from None
        return self

    def _logged(self, text: str, since: int = 0) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controller exited {self.proc.returncode}:\n{_log_tail(self.log_file)}")
        with self.log_file.open("rb") as f:
            f.seek(since)
            return text.encode() in f.read()

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controller exited {self.proc.returncode}:\n{_log_tail(self.log_file)}")
        try:
            return httpx.get(f"{self.url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def mqtt_password(self) -> str:
        """The controller's own broker password, for tests that act as the controller."""
        with (self.data_dir / "controller.toml").open("rb") as f:
            return str(tomllib.load(f)["mqtt_password"])

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def cli(self, *args: str, check: bool = True) -> Any:
        """Run an operator command as a script would (``--json``); return its JSON output."""
        env = {**os.environ, "EDGEFLEET_URL": self.url, "EDGEFLEET_TOKEN": self.token}
        out = subprocess.run(
            [str(BIN / "edgefleet"), "--json", *args], capture_output=True, text=True, env=env
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"edgefleet {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else out


def register_agent(
    controller: Controller, workdir: Path, device_id: str, telemetry_interval: float = 1.0
) -> AgentProcess:
    """Register a device through the operator CLI and write its agent config."""
    data_dir = workdir / device_id
    data_dir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{device_id}.toml"
    socket = data_dir / "inference.sock"
    controller.cli(
        "devices", "register", device_id, "--agent-config", str(config),
        "--agent-data-dir", str(data_dir), "--agent-socket", str(socket),
    )  # fmt: skip
    text = config.read_text()
    if "telemetry_interval_s" in text:
        lines = [
            f"telemetry_interval_s = {telemetry_interval}"
            if line.startswith("telemetry_interval_s")
            else line
            for line in text.splitlines()
        ]
        config.write_text("\n".join(lines) + "\n")
    else:
        config.write_text(f"telemetry_interval_s = {telemetry_interval}\n" + text)
    return AgentProcess(device_id, config, data_dir, socket)


def rollout_done(controller: Controller, rollout_id: str) -> dict[str, Any] | None:
    rollout: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rollout_id}").json()
    return rollout if rollout["status"] in ("succeeded", "failed") else None


def stop_all(agents: Iterable[AgentProcess]) -> None:
    for agent in agents:
        agent.stop()
