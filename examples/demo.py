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
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.tensors import to_numpy  # noqa: E402
from examples.make_digits import INPUT, split, train  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.broker import Broker, free_port, wait_for_port  # noqa: E402
from tests.support.localfleet import Controller, register_agent  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

DEVICES = ["cam-north", "cam-south", "gateway-1"]


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class EmbeddedBroker:
    """amqtt in a thread, for machines without Mosquitto (MQTT 3.1.1 only, no ACL)."""

    def __init__(self) -> None:
        self.port = free_port()
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
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)


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

    agents: list[AgentProcess] = []
    broker: Broker | EmbeddedBroker
    if use_mosquitto:
        broker = Broker(workdir / "mosquitto").start()
        say(f"mosquitto listening on 127.0.0.1:{broker.port} (per-device passwords, pattern ACL)")
        controller = Controller(
            workdir / "controller", broker.port, passwd_file=broker.passwd_file,
            reload_command=broker.reload_command,
        )  # fmt: skip
    else:
        broker = EmbeddedBroker().start()
        say(f"mosquitto not installed: embedded amqtt broker on 127.0.0.1:{broker.port} (MQTT 3.1.1)")
        controller = Controller(workdir / "controller", broker.port, protocol="v311")
    try:
        controller.init()
        controller.start()
        say(f"controller serving {controller.url} (OpenAPI at {controller.url}/docs), admin token created")

        digits = split()
        model = workdir / "digits.onnx"
        model.write_bytes(train(digits.x_train, digits.y_train))
        version = controller.cli(
            "models", "upload", str(model), "--name", "digits", "--version", "1.0.0",
            "--metadata", '{"framework": "scikit-learn", "task": "digit classification"}',
        )  # fmt: skip
        say(f"uploaded digits 1.0.0: {version['size']} bytes, sha256 {version['digest'][:16]}...")

        for device_id in DEVICES:
            agent = register_agent(controller, workdir / "agents", device_id, telemetry_interval=2.0)
            agents.append(agent.start())
            say(f"registered {device_id} and started its agent (data in {agent.data_dir})")
        wait_until(
            lambda: all(d["online"] for d in controller.cli("devices", "list")), 60, "all three agents online"
        )
        say("all three agents are online")

        rollout = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1.0.0",
            *[arg for d in DEVICES for arg in ("--device", d)],
        )  # fmt: skip
        say(f"rollout {rollout['id']} created for {len(DEVICES)} devices")
        seen: dict[str, str] = {}

        def progress() -> dict[str, Any] | None:
            current = controller.cli("rollouts", "show", rollout["id"])
            for device in current["devices"]:
                if seen.get(device["device_id"]) != device["status"]:
                    seen[device["device_id"]] = device["status"]
                    say(f"  {device['device_id']}: {device['status']} {device.get('detail') or ''}")
            return current if current["status"] in ("succeeded", "failed") else None

        final = wait_until(progress, 120, "the rollout to finish", interval=0.3)
        say(f"rollout {final['status']}")
        if final["status"] != "succeeded":
            return 1

        for agent in agents:
            response = agent.infer({INPUT: digits.x_test[:8]})
            predicted = to_numpy(response.outputs["label"]).tolist()
            say(
                f"{agent.device_id} answered {response.model_name} {response.model_version} "
                f"in {response.latency_ms:.2f} ms: predicted {predicted}, true {digits.y_test[:8].tolist()}"
            )
        labels = to_numpy(agents[0].infer({INPUT: digits.x_test}).outputs["label"])
        say(
            f"{DEVICES[0]} classified {len(labels)} held-out digits: "
            f"{float((labels == digits.y_test).mean()):.1%} correct"
        )
        for row in digits.x_test[:50]:
            agents[0].infer({INPUT: row[None, :]})

        def fresh_telemetry() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = controller.cli("telemetry", DEVICES[0], "--limit", "5")
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
        say(f"web console: {controller.url}/ui (log in with the admin token {controller.token})")
        if not args.exit:
            say("the fleet keeps running for the console; Ctrl-C stops it")
            wait_for_interrupt()
        return 0
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
