"""The ingest role's batch path on PostgreSQL: what one ingest process spends a window.

An ingest process receives telemetry messages and, a batch of up to ``MAX_INGEST_BATCH`` at a
time, decodes them, checks each device, stores the windows (with the roll-ups and drift
baselines the role keeps), writes the devices' last_seen and publishes one acknowledgement a
device. This bench runs exactly that code (``Transport._ingest`` of the controller's own
transport, not connected: its acknowledgements are built and queued in paho, not sent) on
the controller's store on a real PostgreSQL (tests/support/postgres.py), beside:

- **raw**: the same telemetry rows written with multi-row INSERTs into a plain table from
  psycopg (bench/postgres_telemetry.py's raw writer): the database's floor.

For each: windows per second and this process's CPU (user + system) per 1,000 windows; the
MQTT receive is not in it (bench/telemetry_ingest.py and bench/fleet_scale.py measure that).
Medians of ``--runs`` interleaved runs.

Run: ``.venv/bin/python bench/ingest_batches.py [--devices 1000] [--windows 20000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto.codec import decode, encode
from edgefleet_proto.topics import Kind, Topic

from bench.postgres_telemetry import controller_store, raw_writer, windows_for
from controller.artifacts import ArtifactStore
from controller.fleet import Fleet
from controller.mosquitto_auth import BrokerAuth, hash_password
from controller.settings import Settings
from controller.transport import MAX_INGEST_BATCH, Inbound, Transport
from tests.support.postgres import Postgres


def measure(write: Callable[[], object], count: int) -> tuple[float, float]:
    """(windows/s, client CPU s per 1,000 windows) of ``write``."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    write()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return count / seconds, cpu * 1000 / count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=20_000, help="windows per run and mode")
    parser.add_argument("--features", type=int, default=16, help="drift sketch features per window (0: none)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # Each acknowledgement of a transport that is not connected logs that it waits.
    logging.disable(logging.WARNING)

    pg = Postgres().start()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    figures: dict[str, list[tuple[float, float]]] = {"ingest role": [], "raw": []}
    try:
        controller_url, raw_url = pg.database(), pg.database()
        telemetry = controller_store(controller_url, args.devices)
        settings = Settings(
            data_dir=work,
            mqtt_password="pw",
            mqtt_password_hash=hash_password("pw"),
            admin_token_sha256="0" * 64,
            mosquitto_passwd_file=work / "passwd",
            broker_reload_command="true",
            database_url=controller_url,
        )
        fleet = Fleet(telemetry.store, settings, BrokerAuth(settings.passwd_file, "true"))
        transport = Transport(settings, fleet, telemetry, ArtifactStore(settings.artifacts_dir, 1024))
        raw_conn, raw_write = raw_writer(raw_url)
        for run in range(args.runs):
            windows = windows_for(args.devices, args.windows, args.features, first_seq=1 + run * args.windows)
            # As they arrive: the payloads the agents publish, decoded by the ingest role.
            payloads = [(device, encode(msg), at) for device, msg, at in windows]

            def ingest(payloads: list[tuple[str, bytes, float]] = payloads) -> None:
                for start in range(0, len(payloads), MAX_INGEST_BATCH):
                    transport._ingest(
                        [
                            Inbound(Topic(device, Kind.TELEMETRY), decode(Kind.TELEMETRY, payload), at, False)
                            for device, payload, at in payloads[start : start + MAX_INGEST_BATCH]
                        ]
                    )

            def raw(windows: list[Any] = windows) -> None:
                for start in range(0, len(windows), MAX_INGEST_BATCH):
                    raw_write(windows[start : start + MAX_INGEST_BATCH])

            order = [("raw", raw), ("ingest role", ingest)]
            for name, write in order if run % 2 == 0 else order[::-1]:
                rate, cpu = measure(write, len(windows))
                figures[name].append((rate, cpu))
                print(
                    f"run {run + 1} {name:12s} {rate:9,.0f} windows/s  client CPU {cpu:.3f} s/1k", flush=True
                )
        raw_conn.close()
        telemetry.store.engine.dispose()
    finally:
        pg.stop()

    def med(name: str, i: int) -> float:
        return float(statistics.median(f[i] for f in figures[name]))

    print()
    print(
        f"ingest batches on PostgreSQL: {args.devices} devices, {args.windows} windows a run, "
        f"{args.features} sketch features, batches of {MAX_INGEST_BATCH}; medians of {args.runs} runs"
    )
    print(f"{'':38s}{'windows/s':>12s}{'client CPU s/1k':>18s}")
    for name, label in (("ingest role", "ingest role (decode, store, ack)"), ("raw", "raw multi-row INSERT")):
        print(f"{label:38s}{med(name, 0):12,.0f}{med(name, 1):18.3f}")
    print(
        f"ratio ingest/raw: rate {med('ingest role', 0) / med('raw', 0):.2f}x, "
        f"client CPU {med('ingest role', 1) / med('raw', 1):.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
