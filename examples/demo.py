"""EdgeFleet demo: a broker, the controller and three agents on this machine.

Uploads a real model (a small network trained on scikit-learn's digits, converted
to ONNX by examples/make_digits.py), rolls it out to three devices over MQTT, asks
each device to classify held-out digits on its gRPC socket and shows the telemetry
the operator reads back. It ends with the web console's address and keeps the fleet
running for it until Ctrl-C (``--exit`` stops at once). Run it with
``scripts/demo.sh`` (the README's demo command), which sets everything up first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.tensors import from_arrays, to_numpy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from examples.make_digits import INPUT, split, train  # noqa: E402

DEVICES = ["cam-north", "cam-south", "gateway-1"]
T = TypeVar("T")
# edgefleet and edgefleet-agent, installed beside this interpreter.
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class Cli:
    """The operator's CLI, as a script runs it (``--json``)."""

    def __init__(self) -> None:
        self.env = dict(os.environ)

    def __call__(self, *args: str) -> Any:
        out = subprocess.run(
            [str(BIN / "edgefleet"), "--json", *args], capture_output=True, text=True, env=self.env
        )
        if out.returncode != 0:
            raise RuntimeError(f"edgefleet {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None


class Mosquitto:
    """The broker ``edgefleet controller init`` configured in the controller's folder."""

    def __init__(self, start_command: str, pid_file: Path, port: int) -> None:
        self.start_command, self.pid_file, self.port = start_command, pid_file, port

    def start(self) -> Mosquitto:
        subprocess.run(shlex.split(self.start_command), check=True)
        wait_until(lambda: listening(self.port), 10, f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(self.pid_file.read_text()), signal.SIGTERM)


class EmbeddedBroker:
    """amqtt in a thread, for machines without Mosquitto (MQTT 3.1.1 only, no ACL)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker as AmqttBroker

        # The port probe below connects without speaking MQTT; amqtt logs that as an error.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()

        async def run() -> Any:
            broker = AmqttBroker(config)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)
        wait_until(lambda: listening(self.port), 10, f"amqtt on port {self.port}")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Device:
    """A registered device and its agent process (``edgefleet-agent run``)."""

    device_id: str
    config: Path
    data_dir: Path
    socket: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> Device:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "edgefleet-agent"), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def infer(self, inputs: dict[str, np.ndarray]) -> inference_pb2.InferResponse:
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            request = inference_pb2.InferRequest(inputs=from_arrays(inputs))
            response: inference_pb2.InferResponse = inference_pb2_grpc.InferenceServiceStub(channel).Infer(
                request, timeout=10
            )
            return response


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register(cli: Cli, workdir: Path, device_id: str, telemetry_interval_s: float) -> Device:
    """Register a device through the operator's CLI, which writes its agent's config."""
    data_dir = workdir / device_id
    data_dir.mkdir(parents=True, exist_ok=True)
    config, sock = workdir / f"{device_id}.toml", data_dir / "inference.sock"
    cli("devices", "register", device_id, "--agent-config", str(config),
        "--agent-data-dir", str(data_dir), "--agent-socket", str(sock))  # fmt: skip
    # Telemetry every few seconds, so that the demo shows it soon.
    lines = [line for line in config.read_text().splitlines() if not line.startswith("telemetry_interval_s")]
    config.write_text(f"telemetry_interval_s = {telemetry_interval_s}\n" + "\n".join(lines) + "\n")
    return Device(device_id, config, data_dir, sock)


def wait_for_interrupt() -> None:
    """Until Ctrl-C or SIGTERM; the caller's ``finally`` stops the fleet."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    say("stopping")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / "demo-data")
    parser.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    parser.add_argument(
        "--exit", action="store_true", help="stop at the end instead of keeping the fleet up for the console"
    )
    args = parser.parse_args()

    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    use_mosquitto = args.broker == "mosquitto" or (
        args.broker == "auto" and (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
    )

    devices: list[Device] = []
    cli = Cli()
    broker_port, port = free_port(), free_port()
    controller_dir = workdir / "controller"
    init = [
        "controller", "init", "--data-dir", str(controller_dir),
        "--broker-host", "127.0.0.1", "--broker-port", str(broker_port),
    ]  # fmt: skip
    broker: Mosquitto | EmbeddedBroker
    if use_mosquitto:
        made = cli(*init)
        broker = Mosquitto(
            made["broker_start_command"], controller_dir / "mosquitto" / "mosquitto.pid", broker_port
        )
        broker.start()
        say(f"mosquitto listening on 127.0.0.1:{broker_port} (per-device passwords, pattern ACL)")
    else:
        made = cli(*init, "--mqtt-protocol", "v311")
        broker = EmbeddedBroker(broker_port).start()
        say(f"mosquitto not installed: embedded amqtt broker on 127.0.0.1:{broker_port} (MQTT 3.1.1)")
    url, token = f"http://127.0.0.1:{port}", made["token"]
    cli.env.update(EDGEFLEET_URL=url, EDGEFLEET_TOKEN=token)
    server: subprocess.Popen[bytes] | None = None
    try:
        with (workdir / "controller.log").open("ab") as log:
            server = subprocess.Popen(
                [str(BIN / "edgefleet"), "controller", "serve", "--data-dir", str(controller_dir),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        cli("status", "--wait", "120")
        say(f"controller serving {url} (OpenAPI at {url}/docs), admin token created")

        digits = split()
        model = workdir / "digits.onnx"
        model.write_bytes(train(digits.x_train, digits.y_train))
        version = cli(
            "models", "upload", str(model), "--name", "digits", "--version", "1.0.0",
            "--metadata", '{"framework": "scikit-learn", "task": "digit classification"}',
        )  # fmt: skip
        say(f"uploaded digits 1.0.0: {version['size']} bytes, sha256 {version['digest'][:16]}...")

        for device_id in DEVICES:
            device = register(cli, workdir / "agents", device_id, telemetry_interval_s=2.0)
            devices.append(device.start(workdir / "agents" / f"{device_id}.log"))
            say(f"registered {device_id} and started its agent (data in {device.data_dir})")
        wait_until(lambda: all(d["online"] for d in cli("devices", "list")), 60, "all three agents online")
        say("all three agents are online")

        rollout = cli(
            "rollouts", "create", "--model", "digits", "--version", "1.0.0",
            *[arg for d in DEVICES for arg in ("--device", d)],
        )  # fmt: skip
        say(f"rollout {rollout['id']} created for {len(DEVICES)} devices")
        seen: dict[str, str] = {}

        def progress() -> dict[str, Any] | None:
            current = cli("rollouts", "show", rollout["id"])
            for device in current["devices"]:
                if seen.get(device["device_id"]) != device["status"]:
                    seen[device["device_id"]] = device["status"]
                    say(f"  {device['device_id']}: {device['status']} {device.get('detail') or ''}")
            return current if current["status"] in ("succeeded", "failed") else None

        final = wait_until(progress, 120, "the rollout to finish", interval=0.3)
        say(f"rollout {final['status']}")
        if final["status"] != "succeeded":
            return 1

        for device in devices:
            response = device.infer({INPUT: digits.x_test[:8]})
            predicted = to_numpy(response.outputs["label"]).tolist()
            say(
                f"{device.device_id} answered {response.model_name} {response.model_version} "
                f"in {response.latency_ms:.2f} ms: predicted {predicted}, true {digits.y_test[:8].tolist()}"
            )
        labels = to_numpy(devices[0].infer({INPUT: digits.x_test}).outputs["label"])
        say(
            f"{DEVICES[0]} classified {len(labels)} held-out digits: "
            f"{float((labels == digits.y_test).mean()):.1%} correct"
        )
        for row in digits.x_test[:50]:
            devices[0].infer({INPUT: row[None, :]})

        def fresh_telemetry() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = cli("telemetry", DEVICES[0], "--limit", "5")
            return rows if any(m["inference_count"] > 0 for r in rows for m in r["models"]) else None

        rows = wait_until(fresh_telemetry, 30, "telemetry with inference statistics")
        latest = next(r for r in rows if any(m["inference_count"] > 0 for m in r["models"]))
        system = latest["system"]
        say(
            f"telemetry from {DEVICES[0]}: cpu {system['cpu_percent']:.1f}%, "
            f"memory {system['mem_percent']:.1f}%, disk {system['disk_percent']:.1f}%"
        )
        for m in latest["models"]:
            say(
                f"  {m['model_name']} {m['model_version']}: {m['inference_count']} inferences, "
                f"{m['error_count']} errors, p50 {m['latency_p50_ms']:.3f} ms, p95 {m['latency_p95_ms']:.3f} ms, "
                f"p99 {m['latency_p99_ms']:.3f} ms"
            )
        say("demo finished: a real broker, ONNX Runtime and SQLite throughout")
        say(f"web console: {url}/ui (log in with the admin token {token})")
        if not args.exit:
            say("the fleet keeps running for the console; Ctrl-C stops it")
            wait_for_interrupt()
        return 0
    finally:
        for device in devices:
            stop(device.proc)
        stop(server)
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
