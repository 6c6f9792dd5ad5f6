"""A three-wave rollout of a 5 MB model to 200 simulated devices, beside the broker's own fan-out.

Starts mosquitto and the controller (whose MQTT connection goes through a byte-
counting TCP relay), registers 200 devices and runs, in the same run:

- ``broker alone``: one publisher sends the model's bytes once, in chunks of the
  controller's chunk size, on a topic that 200 subscribers (the same processes
  as the devices) read; the time until every subscriber has every byte;
- ``rollout``: ``edgefleet rollouts create --all`` with waves of 10 %, 40 % and
  the rest (1 s soak each, the minimum the engine needs to judge a wave) to 200
  simulated devices (tests/simfleet.py: real MQTT clients that fetch windowed,
  checked chunks like the agent); the time from create to ``succeeded``, polled
  20 times a second over one HTTP connection.

Prints both, their ratio (also with the soak taken out) and the controller's
outgoing MQTT bytes per device beside the model size.
Run: ``.venv/bin/python bench/rollout_fleet.py [--devices 200] [--processes 4] [--megabytes 5]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import Broker, free_port
from tests.localfleet import Controller, wait_until
from tests.models import dense_of_size
from tests.simfleet import SimDevice, SimFleet

FANOUT_TOPIC = "edgefleet/bench/fanout"
SOAK_S = 1.0


class CountingRelay:
    """TCP relay from a local port to the broker that counts the bytes the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def take(self) -> int:
        with self._lock:
            sent, self.sent = self.sent, 0
            return sent


def sim_worker(port: int, creds: list[tuple[str, str]], digest: str, out: Any, stop: Any) -> None:
    devices = [SimDevice(d, p, port, keep_models=False) for d, p in creds]
    fleet = SimFleet(devices, telemetry_interval_s=1e9, inferences_per_tick=0, tick_s=0.2).start()
    wait_until(lambda: all(d.connected.is_set() for d in devices), 120, "simulated devices connected")
    out.put(("connected", len(devices), 0))
    while not stop.is_set():
        done = [d for d in devices if d.active is not None and d.active.artifact_digest == digest]
        if len(done) == len(devices):
            out.put(("done", len(devices), sum(d.bytes_received for d in devices)))
            break
        time.sleep(0.05)
    stop.wait()
    fleet.stop()


def sub_worker(port: int, logins: list[tuple[str, str]], index: int, total: int, out: Any, stop: Any) -> None:
    count = len(logins)
    got = [0] * count
    clients = []
    ready = threading.Semaphore(0)
    for i, (username, password) in enumerate(logins):

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage, i: int = i) -> None:
            got[i] += len(msg.payload)

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(FANOUT_TOPIC, qos=1)

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{index}-{i}", protocol=mqtt.MQTTv5
        )
        client.username_pw_set(username, password)
        client.on_message = on_message
        client.on_connect = on_connect
        client.on_subscribe = lambda c, u, mid, rcs, p: ready.release()
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    for _ in range(count):
        ready.acquire(timeout=60)
    out.put(("subscribed", count, 0))
    while not stop.is_set() and sum(got) < total * count:
        time.sleep(0.01)
    out.put(("done", count, sum(got)))
    stop.wait()
    for c in clients:
        c.disconnect()
        c.loop_stop()


def collect(out: Any, kind: str, workers: int, timeout: float) -> list[tuple[str, int, int]]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < workers:
        item = out.get(timeout=max(0.1, deadline - time.monotonic()))
        if item[0] == kind:
            got.append(item)
    return got


def broker_alone(broker: Broker, data: bytes, chunk: int, devices: int, procs: int) -> float:
    out: Any = mp.Queue()
    stop = mp.Event()
    # One broker account per connection: the broker binds client ids to usernames.
    names = [f"bench-sub-{i}" for i in range(devices)] + ["bench-pub"]
    logins = list(zip(names, broker.add_tool_users(names), strict=True))
    workers = [
        mp.Process(target=sub_worker, args=(broker.port, logins[i:devices:procs], i, len(data), out, stop))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    collect(out, "subscribed", procs, 120)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.username_pw_set(*logins[-1])
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    start = time.perf_counter()
    infos = [pub.publish(FANOUT_TOPIC, data[i : i + chunk], qos=1) for i in range(0, len(data), chunk)]
    for info in infos:
        info.wait_for_publish(60)
    results = collect(out, "done", procs, 600)
    elapsed = time.perf_counter() - start
    assert sum(r[2] for r in results) == len(data) * devices, results
    stop.set()
    pub.disconnect()
    pub.loop_stop()
    for w in workers:
        w.join(30)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=5.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    broker = Broker(work / "mosquitto").start()
    relay = CountingRelay(broker.port)
    controller = Controller(
        work / "controller", relay.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    controller.init()
    controller.start()
    stop = mp.Event()
    workers: list[mp.Process] = []
    try:
        model = dense_of_size(work / "model.onnx", args.megabytes)
        data = model.read_bytes()
        version = controller.cli("models", "upload", str(model), "--name", "dense", "--version", "1")
        creds = []
        for i in range(args.devices):
            body = controller.api("POST", "/v1/devices", json={"device_id": f"sim-{i:03}", "tags": []}).json()
            creds.append((body["device_id"], body["mqtt_password"]))
        chunk = 65536

        alone = broker_alone(broker, data, chunk, args.devices, args.processes)

        out: Any = mp.Queue()
        workers = [
            mp.Process(
                target=sim_worker,
                args=(broker.port, creds[i :: args.processes], version["digest"], out, stop),
            )
            for i in range(args.processes)
        ]
        for w in workers:
            w.start()
        collect(out, "connected", args.processes, 180)
        wait_until(
            lambda: sum(d["online"] for d in controller.api("GET", "/v1/devices").json()) == args.devices,
            120,
            "every device online at the controller",
        )
        relay.take()
        start = time.perf_counter()
        rollout = controller.cli(
            "rollouts", "create", "--model", "dense", "--version", "1", "--all",
            "--wave", f"10%:{SOAK_S}", "--wave", f"40%:{SOAK_S}", "--wave", f"100%:{SOAK_S}",
        )  # fmt: skip
        # One connection for the 20 polls a second: a new client per poll (controller.api)
        # took about 3 s of CPU per run from the cores the controller and devices share.
        with httpx.Client(
            base_url=controller.url, headers={"Authorization": f"Bearer {controller.token}"}, timeout=60
        ) as api:
            final = wait_until(
                lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}").json())["state"] != "running" and r,
                1800,
                "the rollout to finish",
                interval=0.05,
            )
        elapsed = time.perf_counter() - start
        sent = relay.take()
        results = collect(out, "done", args.processes, 60)
        received = sum(r[2] for r in results)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        controller.stop()
        broker.stop()

    size = len(data)
    soak = 3 * SOAK_S
    print(
        f"devices {args.devices} in {args.processes} processes, model {size / 1e6:.2f} MB, chunks of {chunk} B"
    )
    print(f"rollout state: {final['state']} ({final['reason']})")
    print(f"broker alone (fan-out of the same bytes to {args.devices} subscribers): {alone:8.2f} s")
    print(f"three-wave rollout, create -> succeeded:                         {elapsed:8.2f} s")
    print(f"  of which soak ({soak:.0f} s) and waits between waves")
    print(
        f"ratio rollout / broker alone: {elapsed / alone:.2f}  (without the soak: {(elapsed - soak) / alone:.2f})"
    )
    print(
        f"controller outgoing MQTT bytes per device: {sent / args.devices / 1e6:.3f} MB "
        f"= {sent / args.devices / size:.3f} x the model; devices received {received / args.devices / 1e6:.3f} MB each"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
