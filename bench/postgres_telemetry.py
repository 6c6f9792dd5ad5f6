"""PostgreSQL sized for telemetry: what the controller's write path costs the database.

Starts a PostgreSQL (tests/support/postgres.py: Debian's server in a temporary folder, fsync and
synchronous commit off, as the suite runs it) and opens the controller's own store on it (its
migrations, its day partitions). Then, for each of ``--runs`` runs, in the same run:

- **controller**: ``--windows`` telemetry windows of ``--devices`` devices (one window a device
  per period, as agents send them, with a drift sketch of ``--features`` features) stored
  through ``TelemetryStore.ingest_many`` with the observers the ingest role has (roll-ups and
  drift baselines), in batches of the ingest role's size;
- **raw**: the same rows (the same columns and JSON) written with multi-row INSERTs into a
  plain table with only a primary key, one transaction a batch: what PostgreSQL takes with
  nothing of the controller around it.

For each: windows per second, the PostgreSQL server's CPU (all its processes, user + system)
per 1,000 windows, the WAL written per window, and, after the controller's runs, the bytes on
disk per stored window (telemetry partitions with their indexes, then everything the windows
added: roll-ups and sketches too). Medians over the runs; these are the figures
docs/scaling.md sizes a database with.

Run: ``.venv/bin/python bench/postgres_telemetry.py [--devices 1000] [--windows 20000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg
from edgefleet_proto import fleet_pb2

from bench.telemetry_ingest import window
from controller.baselines import Baselines
from controller.rollups import DAY_S, Retention, Rollups
from controller.settings import Settings
from controller.store import Store
from controller.telemetry import _COLUMNS, TelemetryStore, _row
from controller.transport import MAX_INGEST_BATCH
from tests.support.postgres import Postgres

RAW_TABLE = "raw_telemetry"


@dataclass
class Figures:
    seconds: float
    server_cpu_s: float
    wal_bytes: int
    windows: int

    @property
    def rate(self) -> float:
        return self.windows / self.seconds

    @property
    def cpu_per_1k(self) -> float:
        return self.server_cpu_s / self.windows * 1000

    @property
    def wal_per_window(self) -> float:
        return self.wal_bytes / self.windows


def server_cpu(postmaster_pid: int) -> float:
    """CPU seconds of the server: the postmaster and every backend and helper it forked."""
    root = psutil.Process(postmaster_pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def postmaster_pid(pg: Postgres) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def wal_lsn(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        return int(row[0])


def device_name(i: int) -> str:
    return f"dev-{i:06d}"


def windows_for(
    devices: int, count: int, features: int, first_seq: int
) -> list[tuple[str, fleet_pb2.Telemetry, float]]:
    """``count`` windows, device after device, each device's seq going up by one a round."""
    now = time.time()
    out = []
    for i in range(count):
        device = device_name(i % devices)
        seq = first_seq + i // devices
        out.append((device, window(device, seq, 1_700_000_000_000 + seq * 10_000, features), now))
    return out


def measure(
    pg: Postgres, url: str, write: Callable[[list[Any]], object], batches: Sequence[list[Any]]
) -> Figures:
    pid = postmaster_pid(pg)
    wal0, cpu0, t0 = wal_lsn(url), server_cpu(pid), time.perf_counter()
    for batch in batches:
        write(batch)
    seconds = time.perf_counter() - t0
    return Figures(seconds, server_cpu(pid) - cpu0, wal_lsn(url) - wal0, sum(len(b) for b in batches))


def default(name: str) -> Any:
    """A controller.toml setting's default."""
    return {f.name: f.default for f in fields(Settings)}[name]


def controller_store(url: str, devices: int) -> TelemetryStore:
    """The ingest role's write path (the store, roll-ups and drift baselines, default settings),
    its devices registered."""
    store = Store(url)
    store.insert_many(
        "devices",
        ("device_id", "tags", "password_hash", "created_at"),
        [(device_name(i), "[]", "", 0.0) for i in range(devices)],
    )
    # The windows' model is registered, as a rolled-out model is (unregistered names are folded).
    store.execute("INSERT INTO models (name, created_at) VALUES ('digits', 0)")
    store.execute(
        "INSERT INTO model_versions (name, version, digest, size, format, inputs, outputs, metadata, created_at)"
        " VALUES ('digits', '1', '', 0, 'onnx', '[]', '[]', '{}', 0)"
    )
    telemetry = TelemetryStore(store)
    window_s = default("rollup_window_s")
    retention = Retention(
        default("telemetry_retention_days") * DAY_S, default("rollup_retention_days") * DAY_S
    )
    rollups = Rollups(store, window_s, retention)
    baselines = Baselines(store, window_s)
    telemetry.batch_observers += [rollups.observe_many, baselines.observe_many]
    return telemetry


def raw_writer(url: str) -> tuple[psycopg.Connection[Any], Callable[[list[Any]], None]]:
    conn = psycopg.connect(url)
    columns = ", ".join(_COLUMNS)
    with conn.transaction():
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (id BIGSERIAL PRIMARY KEY, device_id TEXT, received_at DOUBLE PRECISION,"
            " seq BIGINT, window_start_ms BIGINT, window_end_ms BIGINT, system TEXT, models TEXT,"
            " outbox_dropped BIGINT, shadows TEXT, tenants TEXT)"
        )

    def write(batch: list[Any]) -> None:
        rows = [_row(*w) for w in batch]
        marks = ", ".join(["(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"] * len(rows))
        with conn.transaction():
            conn.execute(
                f"INSERT INTO {RAW_TABLE} ({columns}) VALUES {marks}",
                [v for r in rows for v in r],
            )

    return conn, write


def disk_bytes(url: str) -> tuple[int, int, int]:
    """(bytes of the telemetry partitions with their indexes, of the whole database, stored windows)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname = 'telemetry'"
        ).fetchone()
        whole = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        count = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        assert row is not None and whole is not None and count is not None
        return int(row[0]), int(whole[0]), int(count[0])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=20_000, help="windows stored per run and mode")
    parser.add_argument("--features", type=int, default=16, help="drift sketch features per window (0: none)")
    parser.add_argument("--batch", type=int, default=MAX_INGEST_BATCH)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    pg = Postgres().start()
    try:
        controller_url, raw_url = pg.database(), pg.database()
        telemetry = controller_store(controller_url, args.devices)
        raw_conn, raw_write = raw_writer(raw_url)
        empty = disk_bytes(controller_url)[1]
        ours: list[Figures] = []
        raws: list[Figures] = []
        for run in range(args.runs):
            windows = windows_for(args.devices, args.windows, args.features, first_seq=1 + run * args.windows)
            batches = [windows[i : i + args.batch] for i in range(0, len(windows), args.batch)]
            # Interleaved, the raw side first in odd runs: neither always meets a warmer server.
            order = [("raw", raw_url, raw_write), ("controller", controller_url, telemetry.ingest_many)]
            for name, url, write in order if run % 2 == 0 else order[::-1]:
                figures = measure(pg, url, write, batches)
                (raws if name == "raw" else ours).append(figures)
                print(
                    f"run {run + 1} {name:10s} {figures.rate:9,.0f} windows/s  server CPU "
                    f"{figures.cpu_per_1k:.3f} s/1k  WAL {figures.wal_per_window:,.0f} B/window",
                    flush=True,
                )
        raw_conn.close()
        partitions, whole, stored = disk_bytes(controller_url)
        telemetry.store.engine.dispose()
    finally:
        pg.stop()

    def med(figs: list[Figures], attr: str) -> float:
        return float(statistics.median(getattr(f, attr) for f in figs))

    print()
    print(
        f"PostgreSQL telemetry writes: {args.devices} devices, {args.windows} windows a run, "
        f"{args.features} sketch features, batches of {args.batch}; medians of {args.runs} runs"
    )
    print(f"{'':28s}{'windows/s':>12s}{'server CPU s/1k':>18s}{'WAL B/window':>15s}")
    for name, figs in (("controller (ingest path)", ours), ("raw multi-row INSERT", raws)):
        print(
            f"{name:28s}{med(figs, 'rate'):12,.0f}{med(figs, 'cpu_per_1k'):18.3f}{med(figs, 'wal_per_window'):15,.0f}"
        )
    print(
        f"ratio controller/raw: rate {med(ours, 'rate') / med(raws, 'rate'):.2f}x, "
        f"server CPU {med(ours, 'cpu_per_1k') / med(raws, 'cpu_per_1k'):.2f}x, "
        f"WAL {med(ours, 'wal_per_window') / med(raws, 'wal_per_window'):.2f}x"
    )
    print(
        f"on disk after {stored:,} windows: telemetry partitions {partitions / stored:,.0f} B/window, "
        f"whole database {(whole - empty) / stored:,.0f} B/window (roll-ups, sketches, indexes included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
