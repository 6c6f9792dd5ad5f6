"""A simulated fleet of 10,000 devices on this machine: telemetry ingest and a three-wave rollout.

The devices are tests/support/fleetsim: each is the agent's own session (link, outbox
and sender, updater, key ring) on its own broker login and connection, several
thousand per simulator process on one network loop. They are registered in
batches (POST /v1/device-batches: one password-file rewrite and broker reload per
batch, where one device at a time would rewrite the file and reload the broker
10,000 times). Starts mosquitto and the controller, then measures in one run:

1. the broker's own fan-out: bare paho subscribers, one per device login (the
   devices are not connected yet), read the model's bytes published once in
   chunks of the controller's chunk size on a wave broadcast topic; the time
   until every subscriber has every byte;
2. ingest, per number of ingest workers: every device reports a window every
   ``--period-s``. ``steady``: for ``--steady-s`` seconds, the windows the
   controller stored per second (rows in its database; each window once however
   often a device sent it) and its CPU (psutil, user + system) per 1,000 of them;
   ``burst``: the devices hold their telemetry in their outboxes for ``--hold-s``
   seconds and release it at once; the same figures until every window closed
   before the release is stored, or ``--burst-s`` at most. Beside each, in the same
   run, bare paho subscribers (as many processes as ingest workers, sharing one
   MQTT v5 shared subscription when more than one) receive and decode the same
   windows: distinct windows per second and their CPU per 1,000. The windows the
   devices saw acknowledged (which then leave their outboxes) are printed too;
3. a three-wave rollout (``--waves``, 1 s soak each) of a ``--megabytes`` model to
   ``--rollout-devices`` devices (default all) while telemetry goes on: the time
   from create to succeeded, beside the fan-out of 1. It runs
   before ingest processes are added: with several, a device's reported states reach
   them out of order and an older one may be stored last, holding a wave back.

With ``--database postgresql`` (the default when a count above 1 is asked for) the
controller runs as processes sharing a PostgreSQL database started for the run
(tests/support/postgres.py): ``serve --roles api,chunks,engine`` and N ``serve --roles ingest
--instance i`` processes, whose MQTT 5 shared subscription the broker spreads the
telemetry over; every row of the run then has that layout, 1 worker included, and
the controller's CPU is all its processes'. Counts are measured in increasing order,
workers only ever added: a stopped worker's persistent session would keep taking its
share. With ``--database sqlite`` the controller is one process and only 1 is measured.

Run: ``.venv/bin/python bench/fleet_scale.py [--devices 10000] [--processes 8]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import paho.mqtt.client as mqtt
import psutil
from edgefleet_proto.wave import WAVES_PREFIX
from paho.mqtt.enums import CallbackAPIVersion

from controller.settings import DEFAULT_CHUNK_SIZE
from tests.support.broker import Broker
from tests.support.fleetsim import BareSubscribers, DeviceLogin, SimFleet, SimSettings, WorkerStats
from tests.support.fleetsim.worker import raise_open_files_limit
from tests.support.localfleet import BIN, Controller
from tests.support.models import dense_of_size
from tests.support.postgres import Postgres
from tests.support.waiting import wait_until

BATCH = 5000
TELEMETRY = "edgefleet/v1/devices/+/telemetry"
ROLLOUT_TAG = "bench-rollout"
SOAK_S = 1.0


def progress(message: str) -> None:
    """Where the run is, on stderr (the tables go to stdout at the end)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes and their children."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def roles_available() -> bool:
    """Whether this controller can run ingest workers beside its other roles."""
    out = subprocess.run(
        [str(BIN / "edgefleet"), "controller", "serve", "--help"], capture_output=True, text=True, check=False
    )
    return "--roles" in out.stdout


def register(controller: Controller, count: int, rollout_count: int) -> tuple[list[DeviceLogin], str, float]:
    """Register ``count`` devices in batches; the first ``rollout_count`` are tagged for the rollout."""
    logins: list[DeviceLogin] = []
    key = ""
    start = time.perf_counter()
    for first in range(0, count, BATCH):
        devices = [
            {"device_id": f"sim-{i:05d}", "tags": [ROLLOUT_TAG] if i < rollout_count else []}
            for i in range(first, min(count, first + BATCH))
        ]
        response = controller.api("POST", "/v1/device-batches", json={"devices": devices})
        response.raise_for_status()
        for c in response.json():
            logins.append(DeviceLogin(c["device_id"], c["mqtt_password"]))
            key = c["controller_public_key"]
    return logins, key, time.perf_counter() - start


def fan_out(broker: Broker, logins: list[DeviceLogin], data: bytes, chunk: int, processes: int) -> float:
    """Seconds for the broker to bring ``data``, published once in chunks, to one subscriber per login."""
    topic = f"{WAVES_PREFIX}/bench-fanout/{'0' * 64}"
    subs = BareSubscribers(
        [(d.device_id, d.password) for d in logins], "127.0.0.1", broker.port, topic, processes
    ).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fanout-pub", protocol=mqtt.MQTTv5)
    pub.username_pw_set("bench-fanout-pub", broker.add_tool_user("bench-fanout-pub"))
    pub.max_inflight_messages_set(100)
    wait_until(lambda: pub.connect("127.0.0.1", broker.port) == 0, 30, "the fan-out publisher to connect")
    pub.loop_start()
    try:
        start = time.monotonic()
        infos = [pub.publish(topic, data[i : i + chunk], qos=1) for i in range(0, len(data), chunk)]
        for info in infos:
            info.wait_for_publish(600)
        want = len(data) * len(logins)
        stats = subs.wait(
            lambda s: s.bytes >= want, 1800, "every subscriber to have every byte", interval=0.2
        )
        return stats.last_at - start
    finally:
        pub.disconnect()
        pub.loop_stop()
        subs.stop()


@dataclass(frozen=True)
class Sample:
    """Counters at one moment: what the controller stored, what left the devices' outboxes
    acknowledged, what the bare subscribers got, and the CPU each side used so far."""

    at: float
    stored: int
    windows: int
    acknowledged: int
    cpu_s: float
    bare_windows: int
    bare_messages: int
    bare_cpu_s: float
    bare_last_at: float
    load1: float


def sample(
    stored: Callable[[], int], fleet: SimFleet, bare: BareSubscribers, controller_pids: list[int]
) -> Sample:
    devices, subs = fleet.stats(), bare.stats()
    return Sample(
        time.monotonic(), stored(), devices.windows, devices.acknowledged, cpu_seconds(controller_pids),
        subs.windows, subs.messages, subs.cpu_s, subs.last_at, os.getloadavg()[0],
    )  # fmt: skip


def stored_windows(db: Path) -> int:
    """Telemetry windows in the controller's database (each stored once however often it came)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    finally:
        conn.close()


def stored_windows_pg(url: str) -> int:
    """The same, in the controller's PostgreSQL database."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        return int(row[0]) if row else 0


def add_ingest_workers(controller: Controller, workers: list[Controller], count: int) -> None:
    """Ingest processes up to ``count`` (``serve --roles ingest --instance i``), each on its own
    broker account, sharing the telemetry through the broker's shared subscription."""
    while len(workers) < count:
        workers.append(controller.role_process("ingest", instance=len(workers) + 1).start())


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


@dataclass
class IngestRow:
    workers: int
    phase: str
    start: Sample | None = None
    end: Sample | None = None
    bare_end_at: float = 0.0
    drained: str = ""
    note: str = ""

    def cells(self) -> str:
        if self.note or self.start is None or self.end is None:
            return f"{self.workers:>7}  {self.phase:6}  {self.note}"
        a, b = self.start, self.end
        stored, seconds = b.stored - a.stored, b.at - a.at
        bare, bare_seconds = b.bare_windows - a.bare_windows, (self.bare_end_at or b.at) - a.at
        rate, bare_rate = stored / seconds, bare / bare_seconds
        per_k = 1000 * (b.cpu_s - a.cpu_s) / max(1, stored)
        bare_per_k = 1000 * (b.bare_cpu_s - a.bare_cpu_s) / max(1, bare)
        return (
            f"{self.workers:>7}  {self.phase:6}  {rate:8.0f}  {bare_rate:8.0f}  {ratio(rate, bare_rate):>5}"
            f"  {per_k:8.3f}  {bare_per_k:8.3f}  {ratio(per_k, bare_per_k):>5}"
            f"  | {stored} stored in {seconds:.1f} s, {b.acknowledged - a.acknowledged} acknowledged,"
            f" {b.windows - a.windows} closed; bare {bare} windows ({b.bare_messages - a.bare_messages} messages)"
            f" in {bare_seconds:.1f} s; load {a.load1:.0f}-{b.load1:.0f}{self.drained}"
        )


def ingest(
    stored: Callable[[], int],
    fleet: SimFleet,
    bare: BareSubscribers,
    controller_pids: list[int],
    workers: int,
    args: argparse.Namespace,
) -> list[IngestRow]:
    def now() -> Sample:
        return sample(stored, fleet, bare, controller_pids)

    # Steady: every device every period, for steady_s.
    start = now()
    time.sleep(args.steady_s)
    steady = IngestRow(workers, "steady", start, now())
    # Burst: hold_s of windows kept in the outboxes, then released at once; measured until the
    # controller stored all the windows closed so far, or for burst_s at most.
    held_from = now()
    fleet.hold(True)
    time.sleep(args.hold_s)
    release = now()
    fleet.hold(False)
    held = release.windows - held_from.windows
    burst = IngestRow(workers, "burst", release)
    deadline = release.at + args.burst_s
    bare_done = 0.0
    while True:
        time.sleep(0.5)
        current = now()
        if not bare_done and current.bare_windows - release.bare_windows >= held:
            bare_done = current.bare_last_at
        # Drained: every window closed before the release is stored.
        if current.stored >= release.windows or current.at >= deadline:
            break
    burst.end = current
    burst.bare_end_at = bare_done
    burst.drained = (
        f"; {held} held, drained in {current.at - release.at:.1f} s"
        if current.stored >= release.windows
        else f"; {held} held, not drained after {args.burst_s:g} s ({release.windows - current.stored} behind)"
    )
    return [steady, burst]


def online(controller: Controller) -> int:
    """Devices the controller counts online (from /metrics: GET /v1/devices of 10,000 devices
    would load the controller being measured); -1 while it does not answer."""
    try:
        text = controller.api("GET", "/metrics").text
    except httpx.HTTPError:
        return -1
    found = re.search(r"^edgefleet_devices_online (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


def artifact_bytes(controller: Controller) -> tuple[float, float]:
    """(bytes served to devices one by one, bytes broadcast on wave topics) from /metrics."""
    text = controller.api("GET", "/metrics").text
    served = re.findall(r"^edgefleet_artifact_bytes_served(?:_total)?\{.*\} (\S+)$", text, re.M)
    broadcast = re.findall(r"^edgefleet_artifact_bytes_broadcast(?:_total)?(?:\{.*\})? (\S+)$", text, re.M)
    return sum(map(float, served)), sum(map(float, broadcast))


def rollout(
    controller: Controller,
    fleet: SimFleet,
    digest: str,
    count: int,
    total: int,
    waves: list[str],
    timeout_s: float,
) -> tuple[float, dict[str, Any], list[tuple[int, float]]]:
    body = {
        "model": "dense",
        "version": "1",
        "target": {"all": True} if count == total else {"tags": [ROLLOUT_TAG]},
        "waves": [{"percent": float(w.rstrip("%")), "soak_s": SOAK_S} for w in waves],
    }
    start = time.monotonic()
    # Through the API with a long timeout: a controller behind on its ingest answers late.
    headers = {"Authorization": f"Bearer {controller.token}"}
    created = httpx.post(f"{controller.url}/v1/rollouts", json=body, headers=headers, timeout=600).json()
    with httpx.Client(base_url=controller.url, headers=headers, timeout=120) as api:
        waves_started: list[tuple[int, float]] = []
        while True:
            try:
                r = api.get(f"/v1/rollouts/{created['id']}").json()
            except httpx.HTTPError:
                continue
            wave = int(r["wave"])
            if not waves_started or waves_started[-1][0] != wave:
                waves_started.append((wave, time.monotonic() - start))
            if r["state"] != "running":
                break
            if time.monotonic() - start > timeout_s:
                # Measured anyway: how far it got is the figure.
                break
            # Each answer lists every device of the rollout: polled often, it would load the controller.
            time.sleep(0.2 if count <= 500 else 1.0)
    elapsed = time.monotonic() - start
    if r["state"] == "succeeded":
        fleet.wait_active(digest, 120, count)
    return elapsed, r, waves_started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=8, help="simulator processes")
    parser.add_argument("--ingest-workers", default="1,2,4", help="comma-separated counts of ingest workers")
    parser.add_argument("--period-s", type=float, default=10.0, help="telemetry period of every device")
    parser.add_argument("--steady-s", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=30.0, help="after every device is online")
    parser.add_argument(
        "--online-timeout-s", type=float, default=300.0, help="waiting for the controller to see every device"
    )
    parser.add_argument("--hold-s", type=float, default=30.0, help="telemetry held before the burst")
    parser.add_argument(
        "--burst-s", type=float, default=120.0, help="the burst is measured this long at most"
    )
    parser.add_argument("--megabytes", type=float, default=5.0)
    parser.add_argument("--rollout-devices", type=int, default=0, help="devices the rollout targets (0: all)")
    parser.add_argument("--waves", default="10%,40%,100%")
    parser.add_argument(
        "--rollout-timeout-s",
        type=float,
        default=1800.0,
        help="a rollout still running then is reported as is",
    )
    parser.add_argument("--connect-rate", type=float, default=500.0, help="device connections per second")
    parser.add_argument(
        "--state-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    )
    parser.add_argument(
        "--sim-nice",
        type=int,
        default=10,
        help="niceness of the simulator processes: they stand for hardware elsewhere, so they take the "
        "CPU the controller, the broker and the baselines leave",
    )
    parser.add_argument("--skip-rollout", action="store_true")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default=None,
        help="the controller's database (default: postgresql when a count above 1 is asked for)",
    )
    args = parser.parse_args()
    workers_list = sorted({int(w) for w in args.ingest_workers.split(",") if w.strip()})
    rollout_count = args.rollout_devices or args.devices
    database = args.database or ("postgresql" if any(w > 1 for w in workers_list) else "sqlite")

    hard = raise_open_files_limit()
    if hard < args.devices + 1000:
        print(f"open files limited to {hard}: mosquitto needs one per device", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    state = Path(tempfile.mkdtemp(prefix="fleetsim-", dir=args.state_dir))
    broker = Broker(work / "mosquitto").start()
    controller = Controller(
        work / "controller", broker.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    postgres: Postgres | None = None
    ingest_workers: list[Controller] = []
    if database == "postgresql":
        postgres = Postgres().start()
        postgres.admin('CREATE DATABASE "edgefleet"')
        db_url = postgres.url("edgefleet")
        controller.init("--database", db_url)
        controller.roles = "api,chunks,engine"

        def stored() -> int:
            return stored_windows_pg(db_url)
    else:
        controller.init()

        def stored() -> int:
            return stored_windows(controller.data_dir / "controller.db")

    controller.start()
    assert controller.proc is not None
    if postgres is not None:
        # Reported states, status and desired-state requests need an ingest process from the start.
        add_ingest_workers(controller, ingest_workers, workers_list[0] if workers_list else 1)
    fleet: SimFleet | None = None
    bare: BareSubscribers | None = None
    rows: list[IngestRow] = []
    result: dict[str, Any] = {}
    try:
        logins, key, reg_s = register(controller, args.devices, rollout_count)
        model = dense_of_size(work / "model.onnx", args.megabytes)
        data = model.read_bytes()
        version = controller.cli("models", "upload", str(model), "--name", "dense", "--version", "1")

        progress(f"registered {len(logins)} devices in {reg_s:.1f} s")
        alone = 0.0
        if not args.skip_rollout:
            alone = fan_out(broker, logins[:rollout_count], data, DEFAULT_CHUNK_SIZE, args.processes)
            progress(f"fan-out {alone:.1f} s")

        settings = SimSettings("127.0.0.1", broker.port, key, state, telemetry_interval_s=args.period_s)
        started = time.monotonic()
        fleet = SimFleet(
            logins, settings, args.processes, args.connect_rate, log_dir=work / "fleetsim", nice=args.sim_nice
        ).start()
        fleet.wait_connected(600)
        connect_s = time.monotonic() - started
        progress(f"{args.devices} devices connected {connect_s:.1f} s after start")
        # A controller that cannot keep up drops status messages: measured anyway, and said.
        deadline = time.monotonic() + args.online_timeout_s
        while (seen_online := online(controller)) < args.devices and time.monotonic() < deadline:
            time.sleep(5)
        online_s = time.monotonic() - started
        progress(
            f"{seen_online} of {args.devices} devices online at the controller {online_s:.0f} s after start"
        )
        # The connection storm (a status, a reported state and a desired-state request per
        # device) passes before anything is measured.
        time.sleep(args.settle_s)

        # With the first count of ingest processes asked for (--ingest-workers 4 rolls out with
        # four): reports and status carry (session, seq), so processes that handle one device's
        # reports out of order still keep its newest.
        if not args.skip_rollout:
            progress(f"rollout to {rollout_count} devices with {len(ingest_workers) or 1} ingest process(es)")
            served0, broadcast0 = artifact_bytes(controller)
            waves = [w.strip() for w in args.waves.split(",")]
            elapsed, final, wave_times = rollout(
                controller,
                fleet,
                version["digest"],
                rollout_count,
                args.devices,
                waves,
                args.rollout_timeout_s,
            )
            serving = fleet.stats().active[version["digest"]]
            served1, broadcast1 = artifact_bytes(controller)
            result = {
                "elapsed": elapsed,
                "final": final,
                "waves": wave_times,
                "served": served1 - served0,
                "broadcast": broadcast1 - broadcast0,
                "waves_spec": waves,
                "ingest": len(ingest_workers) or 1,
                "serving": serving,
            }

        for workers in workers_list:
            if workers != 1 and postgres is None:
                note = (
                    "not measured: several ingest processes need --database postgresql"
                    if roles_available()
                    else "not available: controller roles not built"
                )
                rows += [IngestRow(workers, phase, note=note) for phase in ("steady", "burst")]
                continue
            if postgres is not None:
                add_ingest_workers(controller, ingest_workers, workers)
            name = "bench-bare"
            topic = TELEMETRY if workers == 1 else f"$share/{name}/{TELEMETRY}"
            names = [f"{name}-{i}" for i in range(workers)]
            bare = BareSubscribers(
                list(zip(names, broker.add_tool_users(names), strict=True)), "127.0.0.1", broker.port, topic,
                processes=workers, decode=True,
            ).start()  # fmt: skip
            progress(f"ingest with {workers} worker(s)")
            pids = [p.proc.pid for p in [controller, *ingest_workers] if p.proc is not None]
            rows += ingest(stored, fleet, bare, pids, workers, args)
            progress(rows[-2].cells() + "\n" + rows[-1].cells())
            bare.stop()
            bare = None

        last = fleet.stats()
    finally:
        if bare is not None:
            bare.stop()
        if fleet is not None:
            fleet.stop()
        for worker in ingest_workers:
            worker.stop()
        controller.stop()
        broker.stop()
        if postgres is not None:
            postgres.stop()
        # Ten thousand devices' state and outboxes: gigabytes of a memory-backed folder.
        shutil.rmtree(state, ignore_errors=True)

    report(
        args,
        rows,
        result,
        alone,
        len(data),
        reg_s,
        f"{connect_s:.1f} s; {seen_online} of them online at the controller {online_s:.0f} s after start",
        last,
        rollout_count,
    )
    return 0


def report(
    args: argparse.Namespace,
    rows: list[IngestRow],
    result: dict[str, Any],
    alone: float,
    size: int,
    reg_s: float,
    connected: str,
    last: WorkerStats,
    rollout_count: int,
) -> None:
    print(
        f"# {args.devices} simulated devices (the agent's session code, one broker login each) in "
        f"{args.processes} processes on {os.cpu_count()} cores; telemetry every {args.period_s:g} s"
    )
    if args.database == "postgresql" or any(r.workers > 1 and not r.note for r in rows):
        print(
            "controller: PostgreSQL; one api,chunks,engine process and `workers` ingest processes"
            " (serve --roles ingest --instance i); its CPU is all of theirs"
        )
    print(f"registered in batches of {BATCH} in {reg_s:.1f} s; all connected {connected}")
    print(
        f"\n## ingest: steady = {args.steady_s:g} s of normal reporting; burst = {args.hold_s:g} s of windows "
        "held in the outboxes, released at once"
    )
    print("workers  phase   ctrl w/s  bare w/s  ratio  ctrl CPU  bare CPU  ratio  (CPU: s per 1,000 windows)")
    for row in rows:
        print(row.cells())
    if result:
        final = result["final"]
        soak = SOAK_S * len(result["waves_spec"])
        elapsed = result["elapsed"]
        print(
            f"\n## rollout: {len(result['waves_spec'])} waves ({', '.join(result['waves_spec'])}, {SOAK_S:g} s soak "
            f"each) of a {size / 1e6:.2f} MB model to {rollout_count} devices, telemetry going on, "
            f"{result['ingest']} ingest process(es)"
        )
        print(
            f"rollout state: {final['state']} ({final.get('reason', '')}); "
            f"{result['serving']} of {rollout_count} devices serving the new version"
        )
        print(f"broker alone (the same bytes fanned out once to {rollout_count} subscribers): {alone:8.1f} s")
        end = "succeeded" if final["state"] == "succeeded" else f"{final['state']} (stopped waiting)"
        print(f"rollout, create -> {end}: {elapsed:8.1f} s")
        print(
            f"ratio rollout / broker alone: {elapsed / alone:.2f} (without the soak: {(elapsed - soak) / alone:.2f})"
        )
        print("wave started at: " + ", ".join(f"wave {w} {t:.1f} s" for w, t in result["waves"]))
        print(
            f"controller artifact bytes: {result['served'] / 1e6:.1f} MB to devices one by one, "
            f"{result['broadcast'] / 1e6:.1f} MB on wave broadcasts; devices accepted "
            f"{last.chunk_bytes / max(1, rollout_count) / 1e6:.2f} MB each"
        )


if __name__ == "__main__":
    sys.exit(main())
