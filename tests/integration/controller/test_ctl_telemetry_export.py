"""`edgefleet telemetry export` as an operator runs it: a real controller process, telemetry and
events its ingest took in over real MQTT from the devices' own broker logins, a rollout, and
the file read back with sqlite3."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.broker import Broker
from tests.support.controller_process import connect
from tests.support.localfleet import Controller
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# The windows' device time: a fixed morning, so a range in ISO 8601 picks known windows.
BASE = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
BASE_MS = int(BASE.timestamp() * 1000)
WINDOWS = 12


def run(controller: Controller, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_URL": controller.url, "EDGEFLEET_TOKEN": token or controller.token}
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=120)


def as_json(controller: Controller, *args: str, token: str | None = None) -> Any:
    done = run(controller, "--json", *args, token=token)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def window(device_id: str, seq: int) -> fleet_pb2.Telemetry:
    end_ms = BASE_MS + 10_000 * seq
    msg = fleet_pb2.Telemetry(
        device_id=device_id, seq=seq, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    msg.system.cpu_percent = float(seq)
    msg.system.mem_total_bytes = 4 << 30
    msg.models.add(
        tenant="door", model_name="digits", model_version="1", inference_count=10 * seq, error_count=1
    )
    msg.models.add(tenant="door.shadow", model_name="digits", model_version="2", inference_count=seq)
    msg.tenants.add(tenant="door", samples=seq, inferences=10 * seq)
    return msg


def send(controller: Controller, device_id: str, password: str, seqs: range) -> None:
    peer = connect(controller.broker_port, device_id, password, f"{device_id}-export-test")
    try:
        for seq in seqs:
            peer.publish(str(Topic(device_id, Kind.TELEMETRY)), encode(window(device_id, seq)))
        event = fleet_pb2.Event(
            device_id=device_id, at_ms=BASE_MS + 10_000 * seqs[-1], kind="model_activated", severity="info"
        )
        event.attributes["version"] = str(seqs[-1])
        peer.publish(str(Topic(device_id, Kind.EVENTS)), encode(event))
    finally:
        peer.close()

    def stored() -> bool:
        rows = controller.api("GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 1000}).json()
        events = controller.api("GET", f"/v1/devices/{device_id}/events", params={"limit": 1000}).json()
        return {r["seq"] for r in rows} >= set(seqs) and any(e["at_ms"] == event.at_ms for e in events)

    wait_until(stored, 30, f"{device_id}'s telemetry stored")


@pytest.fixture
def controller(broker: Broker, tmp_path: Path, store_url: str) -> Iterator[Controller]:
    """A controller process on SQLite, or on PostgreSQL for the tests marked both_backends."""
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    try:
        c.init(*(("--database", store_url) if store_url else ()))
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def fleet(controller: Controller, tmp_path: Path) -> dict[str, str]:
    """cam-1 and cam-2 with WINDOWS windows and an event each, a rollout to cam-1; the devices'
    broker passwords."""
    passwords = {}
    for device_id in ("cam-1", "cam-2"):
        passwords[device_id] = as_json(controller, "devices", "register", device_id, "--tag", "lobby")[
            "mqtt_password"
        ]
        send(controller, device_id, passwords[device_id], range(1, WINDOWS + 1))
    model = digits_classifier(tmp_path / "digits.onnx").path
    as_json(controller, "models", "upload", str(model), "--name", "digits", "--version", "1", "--no-wait")
    as_json(controller, "rollouts", "create", "--model", "digits", "--version", "1", "--device", "cam-1")
    return passwords


@pytest.mark.slow
@pytest.mark.both_backends
def test_export_writes_the_fleet_into_one_sqlite_file_and_a_second_export_upserts(
    controller: Controller, fleet: dict[str, str], tmp_path: Path
) -> None:
    operator = as_json(controller, "tokens", "create", "--name", "otto", "--role", "operator")["token"]
    out = tmp_path / "exports" / "fleet.sqlite"
    out.parent.mkdir()
    summary = as_json(controller, "telemetry", "export", "--out", str(out), token=operator)
    assert summary["path"] == str(out)
    assert summary["rows"] == {
        "telemetry": 2 * WINDOWS,
        "model_stats": 4 * WINDOWS,
        "tenant_stats": 2 * WINDOWS,
        "events": 2,
        "devices": 2,
        "rollouts": 1,
        "rollout_devices": 1,
    }
    assert [p.name for p in out.parent.iterdir()] == ["fleet.sqlite"]
    assert query(out, "PRAGMA journal_mode") == [("delete",)]
    assert query(
        out,
        "SELECT device_id, seq, window_end_ms, system_cpu_percent, system_mem_total_bytes FROM telemetry"
        " WHERE seq = 3 ORDER BY device_id",
    ) == [("cam-1", 3, BASE_MS + 30_000, 3.0, 4 << 30), ("cam-2", 3, BASE_MS + 30_000, 3.0, 4 << 30)]
    per_version = query(
        out,
        "SELECT m.model_version, sum(m.inference_count) FROM model_stats m"
        " JOIN telemetry t ON t.id = m.telemetry_id WHERE t.device_id = 'cam-2' GROUP BY 1 ORDER BY 1",
    )
    assert per_version == [("1", 10 * sum(range(1, WINDOWS + 1))), ("2", sum(range(1, WINDOWS + 1)))]
    assert query(
        out, "SELECT device_id, kind, json_extract(attributes, '$.version') FROM events ORDER BY 1"
    ) == [
        ("cam-1", "model_activated", str(WINDOWS)),
        ("cam-2", "model_activated", str(WINDOWS)),
    ]
    assert query(out, "SELECT device_id, json_extract(tags, '$[0]') FROM devices ORDER BY 1") == [
        ("cam-1", "lobby"),
        ("cam-2", "lobby"),
    ]
    assert query(
        out,
        "SELECT r.model, r.version, d.device_id FROM rollouts r JOIN rollout_devices d ON d.rollout_id = r.id",
    ) == [("digits", "1", "cam-1")]
    indexes = {name for (name,) in query(out, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"idx_telemetry_device_id_window_end_ms", "idx_events_device_id_at_ms"} <= indexes

    # Again, after cam-2 sent two more windows: nothing twice, the new windows added.
    send(controller, "cam-2", fleet["cam-2"], range(WINDOWS + 1, WINDOWS + 3))
    again = as_json(controller, "telemetry", "export", "--out", str(out), token=operator)
    assert again["rows"]["telemetry"] == 2 * WINDOWS + 2
    assert query(out, "SELECT count(*), count(DISTINCT id) FROM telemetry") == [
        (2 * WINDOWS + 2, 2 * WINDOWS + 2)
    ]
    assert query(out, "SELECT count(*) FROM model_stats") == [(4 * WINDOWS + 4,)]
    assert query(out, "SELECT count(*) FROM events") == [(3,)]
    assert query(out, "SELECT count(*) FROM devices") == [(2,)]
    assert (
        query(out, "SELECT controller, tables FROM exports")
        == [(controller.url, "telemetry,events,rollouts,devices")] * 2
    )
    assert [p.name for p in out.parent.iterdir()] == ["fleet.sqlite"]

    # One device, a range of its clock, two kinds of rows: windows 3 to 5 (the end is excluded).
    since = datetime.fromtimestamp((BASE_MS + 30_000) / 1000, UTC).isoformat()
    until = datetime.fromtimestamp((BASE_MS + 60_000) / 1000, UTC).isoformat()
    some = tmp_path / "exports" / "cam-2.sqlite"
    picked = as_json(
        controller, "telemetry", "export", "--out", str(some), "--device", "cam-2",
        "--since", since, "--until", until, "--tables", "telemetry,devices",
    )  # fmt: skip
    assert picked["rows"] == {"telemetry": 3, "model_stats": 6, "tenant_stats": 3, "devices": 1}
    assert query(some, "SELECT device_id, seq FROM telemetry ORDER BY seq") == [
        ("cam-2", s) for s in (3, 4, 5)
    ]
    tables = {name for (name,) in query(some, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "events" not in tables and "rollouts" not in tables
    assert json.loads(query(some, "SELECT rows FROM exports")[0][0])["telemetry"] == 3

    # What `telemetry DEVICE` always did, and its new name.
    assert [w["seq"] for w in as_json(controller, "telemetry", "cam-1", "--limit", "2")] == [
        WINDOWS,
        WINDOWS - 1,
    ]
    assert as_json(controller, "telemetry", "show", "cam-1", "--limit", "2") == as_json(
        controller, "telemetry", "cam-1", "--limit", "2"
    )


@pytest.mark.slow
def test_bad_input_gets_a_clear_error_and_leaves_no_file(controller: Controller, tmp_path: Path) -> None:
    as_json(controller, "devices", "register", "cam-1")
    folder = tmp_path / "exports"
    folder.mkdir()
    kept = folder / "kept.sqlite"
    assert run(controller, "telemetry", "export", "--out", str(kept), "--tables", "devices").returncode == 0
    kept_bytes = kept.read_bytes()
    notes = folder / "notes.txt"
    notes.write_text("not a database")
    cases: list[tuple[list[str], str]] = [
        (["--out", str(folder / "missing" / "f.sqlite")], "missing does not exist"),
        (["--out", str(notes / "f.sqlite")], "notes.txt is not a folder"),
        (["--out", str(folder)], "is a folder"),
        (["--out", str(notes)], "not a SQLite file"),
        (["--out", str(folder / "f.sqlite"), "--since", "1h", "--until", "2h"], "is not before --until"),
        (["--out", str(folder / "f.sqlite"), "--since", "last tuesday"], "--since 'last tuesday'"),
        (
            ["--out", str(folder / "f.sqlite"), "--device", "cam-1", "--device", "ghost"],
            "unknown device ghost",
        ),
        (["--out", str(folder / "f.sqlite"), "--tables", "telemetry,metrics"], "not metrics"),
        (["--out", str(kept), "--device", "ghost"], "unknown device ghost"),
    ]
    for args, message in cases:
        done = run(controller, "telemetry", "export", *args)
        assert done.returncode == 1 and done.stdout == "", (args, done.stderr)
        assert message in done.stderr and done.stderr.startswith("error: "), (args, done.stderr)
    assert sorted(p.name for p in folder.iterdir()) == ["kept.sqlite", "notes.txt"]
    assert kept.read_bytes() == kept_bytes and notes.read_text() == "not a database"

    # The API says the same to a script.
    api = controller.api("GET", "/v1/export/telemetry", params={"since_ms": 2, "until_ms": 1})
    assert api.status_code == 422 and "holds no time" in api.json()["detail"]
    api = controller.api("GET", "/v1/export/events", params={"device": ["cam-1", "ghost"]})
    assert api.status_code == 404 and api.json()["detail"] == "unknown device ghost"
    assert controller.api("GET", "/v1/export/telemetry", params={"cursor": "bm9wZQ"}).status_code == 422
    assert controller.api("GET", "/v1/export/metrics").status_code == 422

    # A controller that does not answer: the same, and still no file.
    gone = Controller(tmp_path / "gone", controller.broker_port, token="t")
    done = run(gone, "telemetry", "export", "--out", str(folder / "f.sqlite"))
    assert done.returncode == 1 and "cannot reach the controller" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["kept.sqlite", "notes.txt"]
