"""Telemetry ingest through the real controller, beside raw batched SQLite inserts.

Starts mosquitto and ``edgefleet controller serve`` (a separate process, so its
CPU can be measured alone), registers ``--devices`` simulated devices and
publishes their telemetry with real MQTT clients (``--clients`` connections,
QoS 1; they use the controller's own broker account, which may publish under
every device, so a thousand devices do not need a thousand sockets on a
2-core machine). Each window carries system stats, one model's statistics and
a drift sketch of ``--features`` features (10 bins each), like an agent's.

Measures, in the same run:

1. ingest rate: ``--burst`` windows published as fast as the clients can,
   timed until the last row is in the controller's SQLite file, against
   ``raw``: the same rows (telemetry + drift sketch) inserted with
   ``executemany`` in transactions of 500 into a fresh database with the same
   schema — the floor, without MQTT, protobuf or roll-ups — and ``bare MQTT``:
   a plain paho subscriber that receives and decodes the same messages and
   stores nothing (the transport's own ceiling on this machine);
2. controller CPU (psutil, user + system) while every device reports every
   ``--period-s`` seconds for ``--duration-s``, against the same controller idle
   for as long; printed per 1,000 devices.

Run: ``.venv/bin/python bench/telemetry_ingest.py [--devices 1000 --burst 20000]``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from controller.store import Store
from controller.telemetry import fields_dict
from tests.support.broker import Broker
from tests.support.localfleet import Controller
from tests.support.waiting import wait_until

BINS = 10


def window(device: str, seq: int, end_ms: int, features: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(
        device_id=device, seq=seq, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    msg.system.cpu_percent = 12.5
    msg.system.mem_total_bytes = 4 << 30
    msg.system.mem_used_bytes = 1 << 30
    msg.system.load1 = 0.4
    msg.models.add(
        tenant="default",
        model_name="digits",
        model_version="1",
        inference_count=100 + seq % 7,
        error_count=seq % 3,
        latency_p50_ms=1.2,
        latency_p95_ms=2.5,
        latency_p99_ms=4.0,
    )
    if features:
        sketch = msg.drift.add(tenant="default", model_name="digits", model_version="1", samples=100)
        edges = [float(i) for i in range(1, BINS)]
        for f in range(features):
            sketch.features.add(name=f"f{f}", edges=edges, counts=[10] * BINS)
        sketch.class_counts.extend([10] * 10)
        sketch.confidence.edges.extend([0.1 * i for i in range(1, 10)])
        sketch.confidence.counts.extend([10] * 10)
    return msg


class Publishers:
    def __init__(self, port: int, logins: list[tuple[str, str]]) -> None:
        self.clients = []
        for username, password in logins:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
            c.username_pw_set(username, password)
            c.max_inflight_messages_set(200)
            c.max_queued_messages_set(0)
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)
        self.count = 0

    def publish(self, device: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        client = self.clients[self.count % len(self.clients)]
        self.count += 1
        return client.publish(str(Topic(device, Kind.TELEMETRY)), payload, qos=1)

    def close(self) -> None:
        for c in self.clients:
            c.loop_stop()
            c.disconnect()


def rows_in(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    finally:
        conn.close()


def raw_inserts(path: Path, messages: list[tuple[str, fleet_pb2.Telemetry]]) -> float:
    """Seconds to insert the rows the controller writes for ``messages`` (telemetry + sketch), batched."""
    store = Store(path)
    devices = sorted({d for d, _ in messages})
    with store.transaction():
        for d in devices:
            store.execute(
                "INSERT INTO devices (device_id, tags, password_hash, created_at) VALUES (?, '[]', '', 0)",
                (d,),
            )
    telemetry = [
        (d, 0.0, m.seq, m.window_start_ms, m.window_end_ms, json.dumps(fields_dict(m.system)),
         json.dumps([fields_dict(s) for s in m.models]), 0)
        for d, m in messages
    ]  # fmt: skip
    sketches = [
        (d, s.tenant, s.model_name, s.model_version, m.window_start_ms, m.window_end_ms, 0.0, s.samples,
         s.SerializeToString())
        for d, m in messages for s in m.drift
    ]  # fmt: skip
    # The schema is the controller's (its migrations); the inserts are sqlite3's own.
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    start = time.perf_counter()
    for i in range(0, len(telemetry), 500):
        with conn:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT OR IGNORE INTO telemetry (device_id, received_at, seq, window_start_ms, window_end_ms,"
                " system, models, outbox_dropped) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                telemetry[i : i + 500],
            )
            batch = sketches[
                i * len(sketches) // len(telemetry) : (i + 500) * len(sketches) // len(telemetry)
            ]
            conn.executemany(
                "INSERT INTO drift_sketches (device_id, tenant, model_name, model_version, window_start_ms,"
                " window_end_ms, received_at, samples, sketch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def mqtt_floor(
    port: int, login: tuple[str, str], pub_logins: list[tuple[str, str]], payloads: list[tuple[str, bytes]]
) -> float:
    """Seconds for a bare paho subscriber (receive + protobuf decode, nothing stored) to get them all."""
    got = 0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal got
        fleet_pb2.Telemetry.FromString(bytes(message.payload))
        got += 1
        if got == len(payloads):
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-floor", protocol=mqtt.MQTTv5)
    sub.username_pw_set(*login)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("edgefleet/v1/devices/+/telemetry", qos=1)

    def network() -> None:  # as the controller runs it: client.loop() in a thread
        while not done.is_set():
            sub.loop(timeout=0.5)

    threading.Thread(target=network, daemon=True).start()
    subscribed.wait(10)
    pubs = Publishers(port, pub_logins)
    start = time.perf_counter()
    for d, p in payloads:
        pubs.publish(d, p)
    done.wait(600)
    elapsed = time.perf_counter() - start
    pubs.close()
    sub.disconnect()
    return elapsed


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=20000, help="windows published for the ingest rate")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--features", type=int, default=16, help="drift sketch features per window (0: none)")
    parser.add_argument("--period-s", type=float, default=10.0)
    parser.add_argument("--duration-s", type=float, default=30.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    broker = Broker(work / "mosquitto").start()
    controller = None
    pubs: Publishers | None = None
    try:
        controller = Controller(
            work / "controller",
            broker.port,
            passwd_file=broker.passwd_file,
            reload_command=broker.reload_command,
        )
        controller.init()
        devices = [f"dev-{i:05d}" for i in range(args.devices)]
        # The simulated devices publish through the controller's account, so they need no broker
        # passwords: put them straight into the fleet table instead of 1,000 API calls.
        setup = Store(controller.data_dir / "controller.db")
        with setup.transaction():
            for d in devices:
                setup.execute(
                    "INSERT INTO devices (device_id, tags, password_hash, created_at) VALUES (?, '[]', '', 0)",
                    (d,),
                )
        setup.close()
        now_ms = int(time.time() * 1000)
        messages = [
            (
                devices[i % len(devices)],
                window(devices[i % len(devices)], i // len(devices), now_ms - 3_600_000 + i, args.features),
            )
            for i in range(args.burst)
        ]
        payloads = [(d, encode(m)) for d, m in messages]
        # Before the controller runs, so the two do not share the broker.
        # One broker account per connection (the broker binds client ids to usernames), none
        # of them the controller's: a second login with its credentials would take it over.
        names = [f"bench-pub-{i}" for i in range(args.clients)]
        pub_logins = list(zip(names, broker.add_tool_users(names), strict=True))
        floor_login = ("bench-floor", broker.add_tool_user("bench-floor"))
        floor_s = mqtt_floor(broker.port, floor_login, pub_logins, payloads)
        controller.start()
        assert controller.proc is not None
        proc = psutil.Process(controller.proc.pid)
        pubs = Publishers(broker.port, pub_logins)
        size = sum(len(p) for _, p in payloads) / len(payloads)
        db = controller.data_dir / "controller.db"

        cpu0 = cpu_seconds(proc)
        start = time.perf_counter()
        for d, p in payloads:
            pubs.publish(d, p)
        published = time.perf_counter() - start
        wait_until(lambda: rows_in(db) >= args.burst, 600, "every window stored", interval=0.1)
        ingest_s = time.perf_counter() - start
        ingest_cpu = cpu_seconds(proc) - cpu0
        raw_s = raw_inserts(work / "raw.db", messages)

        print(
            f"# {args.burst} windows of {size:.0f} bytes ({args.features} sketch features) from {args.devices} devices over {args.clients} MQTT clients; 2-core shared machine"
        )
        print(
            f"controller ingest (MQTT -> SQLite)   {args.burst / ingest_s:10.0f} windows/s   ({ingest_s:.2f} s; publishing took {published:.2f} s; controller CPU {ingest_cpu:.2f} s)"
        )
        print(f"raw batched inserts (same rows)      {args.burst / raw_s:10.0f} windows/s   ({raw_s:.2f} s)")
        print(
            f"bare MQTT receive (paho, no storage) {args.burst / floor_s:10.0f} windows/s   ({floor_s:.2f} s)"
        )
        print(f"ratio controller/raw                 {raw_s / ingest_s:10.3f}")
        print(f"ratio controller/bare MQTT           {floor_s / ingest_s:10.3f}")

        # Steady state: idle first, then every device every period_s.
        idle0 = cpu_seconds(proc)
        time.sleep(args.duration_s)
        idle = cpu_seconds(proc) - idle0
        rate = args.devices / args.period_s
        seq = args.burst
        busy0 = cpu_seconds(proc)
        start = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - start) < args.duration_s:
            due = int(elapsed * rate) + 1
            while sent < due:
                d = devices[sent % len(devices)]
                pubs.publish(d, encode(window(d, seq + sent, int(time.time() * 1000), args.features)))
                sent += 1
            time.sleep(0.01)
        wait_until(lambda: rows_in(db) >= args.burst + sent, 120, "steady windows stored", interval=0.2)
        busy = cpu_seconds(proc) - busy0
        per_k = 1000 / args.devices
        load_pct = 100 * busy / args.duration_s
        idle_pct = 100 * idle / args.duration_s
        print(
            f"\n# steady: {args.devices} devices every {args.period_s:g} s ({rate:.0f} windows/s) for {args.duration_s:g} s"
        )
        print(f"controller CPU reporting            {load_pct:8.2f} % of one core")
        print(f"controller CPU idle (baseline)      {idle_pct:8.2f} % of one core")
        print(
            f"per 1,000 devices every 10 s        {(load_pct - idle_pct) * per_k * args.period_s / 10:8.2f} % of one core above idle (ratio reporting/idle {load_pct / max(idle_pct, 0.01):.1f})"
        )
    finally:
        if pubs is not None:
            pubs.close()
        if controller is not None:
            controller.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
