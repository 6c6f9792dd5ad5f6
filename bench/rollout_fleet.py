"""A three-wave rollout of a 5 MB model to 200 simulated devices, by wave broadcast and by unicast,
beside the broker's own fan-out.

Starts mosquitto and the controller (whose MQTT connection goes through a byte-
counting TCP relay, tests/support/mqtt_relay.py), registers 200 devices and runs, ``--runs``
times each, interleaved, in the same run:

- ``broker alone``: one publisher sends the model's bytes once, in chunks of the
  controller's chunk size, on a topic that 200 subscribers (the same processes
  as the devices) read; the time until every subscriber has every byte;
- ``broadcast``: ``edgefleet rollouts create --all`` with waves of 10 %, 40 % and
  the rest (1 s soak each, the minimum the engine needs to judge a wave) to 200
  simulated devices (tests/support/fleetsim: the agent's own session, updater and chunk
  intake on one broker login each, several devices a process, which take the wave's
  sealed broadcast and ask for what they miss), with the controller's
  ``artifact_delivery = "broadcast"`` (the default); the time from create to
  ``succeeded``, polled 20 times a second over one HTTP connection;
- ``unicast``: the same with ``artifact_delivery = "unicast"`` (the controller
  restarted in between): every device fetches its own copy by windowed requests.

Each run rolls out a new version of the same size, and (by broadcast) a model of
one chunk: the floor that waves, soak, desired states and reports cost with next to
nothing to send. Prints the medians, their ratios to the broker alone (also with the
soak taken out, and beyond the floor), and the controller's outgoing MQTT bytes in each
wave beside the model size.
Run: ``.venv/bin/python bench/rollout_fleet.py [--devices 200] [--processes 4] [--megabytes 5] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.fleetsim import DeviceLogin, SimFleet, SimSettings
from tests.support.localfleet import Controller
from tests.support.models import dense_of_size
from tests.support.mqtt_relay import Relay
from tests.support.waiting import wait_until

FANOUT_TOPIC = "edgefleet/bench/fanout"
SOAK_S = 1.0
# The one-chunk model of the floor rollout.
FLOOR_MB = 0.03


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


def set_delivery(controller: Controller, delivery: str) -> None:
    """Restart the controller with ``artifact_delivery = delivery`` when it runs another."""
    path = controller.data_dir / "controller.toml"
    doc = tomllib.loads(path.read_text())
    if doc.get("artifact_delivery", "broadcast") == delivery and controller.proc is not None:
        return
    controller.stop()
    doc["artifact_delivery"] = delivery
    path.write_text(tomli_w.dumps(doc))
    controller.start()


def roll_out(
    controller: Controller, relay: Relay, version: dict[str, Any], fleet: SimFleet
) -> dict[str, Any]:
    """One three-wave rollout of ``version`` to every device: seconds, egress per wave, final state."""
    wait_until(
        lambda: all(d["online"] for d in controller.api("GET", "/v1/devices").json()),
        120,
        "every device online at the controller",
    )
    relay.take()
    before = fleet.stats().chunk_bytes
    start = time.perf_counter()
    rollout = controller.cli(
        "rollouts", "create", "--model", "dense", "--version", version["version"], "--all",
        "--wave", f"10%:{SOAK_S}", "--wave", f"40%:{SOAK_S}", "--wave", f"100%:{SOAK_S}",
    )  # fmt: skip
    egress = [0, 0, 0]
    wave = 1

    def finished(api: httpx.Client) -> dict[str, Any] | None:
        nonlocal wave
        r: dict[str, Any] = api.get(f"/v1/rollouts/{rollout['id']}").json()
        # What the controller sent since the last poll goes to the wave going on now: a wave
        # sends right after it starts, and next to nothing while the one before soaks.
        wave = max(wave, min(3, r["wave"] or 1))
        egress[wave - 1] += relay.take()
        return r if r["state"] != "running" else None

    # One connection for the 20 polls a second: a new client per poll (controller.api)
    # took about 3 s of CPU per run from the cores the controller and devices share.
    with httpx.Client(
        base_url=controller.url, headers={"Authorization": f"Bearer {controller.token}"}, timeout=60
    ) as api:
        final = wait_until(lambda: finished(api), 1800, "the rollout to finish", interval=0.05)
    elapsed = time.perf_counter() - start
    egress[wave - 1] += relay.take()
    received = fleet.wait_active(version["digest"], 120).chunk_bytes - before
    return {"seconds": elapsed, "egress": egress, "final": final, "received": received}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    broker = Broker(work / "mosquitto").start()
    relay = Relay(broker.port)
    controller = Controller(
        work / "controller", relay.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    controller.init()
    controller.start()
    fleet: SimFleet | None = None
    alone: list[float] = []
    # Each right after a controller (re)start but the floor, which follows the broadcast.
    runs: dict[str, list[dict[str, Any]]] = {"broadcast": [], "floor": [], "unicast": []}
    try:
        logins: list[DeviceLogin] = []
        key = ""
        for i in range(args.devices):
            body = controller.api("POST", "/v1/devices", json={"device_id": f"sim-{i:03}", "tags": []}).json()
            logins.append(DeviceLogin(body["device_id"], body["mqtt_password"]))
            key = body["controller_public_key"]
        chunk = 65536
        # No telemetry: the rollouts are what is measured.
        settings = SimSettings("127.0.0.1", broker.port, key, work / "fleetsim", telemetry_interval_s=1e9)
        fleet = SimFleet(logins, settings, args.processes).start()
        fleet.wait_connected(180)
        size = number = 0
        for run in range(args.runs):
            for kind in runs:
                # A new version each time: every device downloads it. The floor is a model of
                # one chunk: the same waves, soak and reports with next to nothing to send.
                number += 1
                megabytes = FLOOR_MB if kind == "floor" else args.megabytes
                model = dense_of_size(work / f"model-{number}.onnx", megabytes, seed=number)
                data = model.read_bytes()
                version = controller.cli(
                    "models", "upload", str(model), "--name", "dense", "--version", str(number)
                )
                if kind == "broadcast":
                    size = len(data)
                    alone.append(broker_alone(broker, data, chunk, args.devices, args.processes))
                set_delivery(controller, "unicast" if kind == "unicast" else "broadcast")
                result = roll_out(controller, relay, version, fleet)
                runs[kind].append(result)
                print(
                    f"run {run + 1} {kind:9} {result['seconds']:6.2f} s, state {result['final']['state']}, "
                    f"egress per wave {'/'.join(f'{e / len(data):.3f}' for e in result['egress'])} x the model"
                    + (f", broker alone {alone[-1]:.2f} s" if kind == "broadcast" else ""),
                    flush=True,
                )
    finally:
        if fleet is not None:
            fleet.stop()
        controller.stop()
        broker.stop()

    soak = 3 * SOAK_S
    base = statistics.median(alone)
    waves = [round(args.devices * 0.1), round(args.devices * 0.4)]
    waves.append(args.devices - sum(waves))
    print(
        f"devices {args.devices} in {args.processes} processes, model {size / 1e6:.2f} MB, chunks of {chunk} B, "
        f"waves of {'/'.join(map(str, waves))} devices, {args.runs} runs each (medians)"
    )
    print(f"broker alone (fan-out of the same bytes to {args.devices} subscribers): {base:8.2f} s")
    floor = statistics.median(r["seconds"] for r in runs["floor"])
    print(
        f"three-wave rollout of a one-chunk model (waves, soak, reports; next to nothing to send): {floor:8.2f} s"
    )
    for delivery in ("broadcast", "unicast"):
        results = runs[delivery]
        seconds = statistics.median(r["seconds"] for r in results)
        per_wave = [statistics.median(r["egress"][w] for r in results) / size for w in range(3)]
        print(
            f"three-wave rollout by {delivery:9}, create -> succeeded: {seconds:8.2f} s = "
            f"{seconds / base:.2f} x the broker alone (without the {soak:.0f} s of soak: {(seconds - soak) / base:.2f}); "
            f"beyond the one-chunk rollout {seconds - floor:.2f} s = {(seconds - floor) / base:.2f} x the broker alone"
        )
        print(
            f"  controller egress per wave / model size: {' / '.join(f'{e:.3f}' for e in per_wave)} "
            f"(waves of {'/'.join(map(str, waves))} devices)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
