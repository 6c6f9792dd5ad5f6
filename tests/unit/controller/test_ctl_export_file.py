"""The export file (sqlite-utils): its tables follow the API's bodies, a second export upserts,
and a failed one leaves no file and the previous one as it was; and how `telemetry export`
reads its options."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.cli import CommandError
from controller.cli_telemetry import parse_range, parse_tables, select_rollouts, with_default_action
from controller.export_file import GROUPS, TABLES, ExportFile, ExportFileError, rollout_rows, window_rows

NOW = datetime(2026, 12, 7, 13, 30, tzinfo=UTC).timestamp()
SYSTEM = {
    "cpu_percent": 12.5,
    "mem_total_bytes": 4_000_000_000,
    "mem_used_bytes": 1_000_000_000,
    "mem_percent": 25.0,
    "disk_total_bytes": 10,
    "disk_used_bytes": 5,
    "disk_percent": 50.0,
    "temperature_c": None,
    "load1": 0.5,
}


def model_stats(version: str, count: int) -> dict[str, Any]:
    return {
        "tenant": "door",
        "model_name": "digits",
        "model_version": version,
        "inference_count": count,
        "error_count": 1,
        "latency_p50_ms": 1.5,
        "latency_p95_ms": 3.0,
        "latency_p99_ms": None,
        "pipeline_inferences": count,
        "pipeline_errors": 1,
        "grpc_inferences": 0,
        "grpc_errors": 0,
        "shadow_inferences": 0,
        "shadow_errors": 0,
    }


def window(id_: int, device_id: str = "cam-1", temperature: float | None = None) -> dict[str, Any]:
    """A window as GET /v1/export/telemetry gives it."""
    return {
        "id": id_,
        "device_id": device_id,
        "received_at": 1000.0 + id_,
        "window_start_ms": 10_000 * id_,
        "window_end_ms": 10_000 * id_ + 9_999,
        "seq": id_,
        "system": {**SYSTEM, "temperature_c": temperature},
        "models": [model_stats("1.0.0", 10 * id_), model_stats("1.1.0", id_)],
        "outbox_dropped": 0,
        "shadows": [],
        "tenants": [],
    }


def event(id_: int) -> dict[str, Any]:
    return {
        "id": id_,
        "device_id": "cam-1",
        "received_at": 1.0,
        "at_ms": 5 * id_,
        "kind": "model_activated",
        "severity": "info",
        "message": "ok",
        "attributes": {"version": "1.1.0"},
    }


def write(
    target: Path, windows: list[dict[str, Any]], events: list[dict[str, Any]] | None = None
) -> dict[str, int]:
    with ExportFile(target, ["telemetry", "events"]) as out:
        for w in windows:
            out.add(window_rows(w))
        out.add({"events": events or []})
        out.record({"controller": "http://ctl", "tables": "telemetry,events"})
    return out.counts


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def test_windows_become_flat_rows_keyed_by_the_controllers_ids(tmp_path: Path) -> None:
    target = tmp_path / "fleet.sqlite"
    counts = write(target, [window(1, temperature=41.5), window(2)], [event(7)])
    assert counts == {"telemetry": 2, "model_stats": 4, "events": 1}
    assert rows(
        target, "SELECT id, device_id, seq, system_cpu_percent, system_temperature_c FROM telemetry"
    ) == [
        (1, "cam-1", 1, 12.5, 41.5),
        (2, "cam-1", 2, 12.5, None),
    ]
    assert rows(
        target,
        "SELECT t.seq, m.position, m.model_version, m.inference_count, typeof(m.latency_p50_ms)"
        " FROM model_stats m JOIN telemetry t ON t.id = m.telemetry_id ORDER BY 1, 2",
    ) == [
        (1, 0, "1.0.0", 10, "real"),
        (1, 1, "1.1.0", 1, "real"),
        (2, 0, "1.0.0", 20, "real"),
        (2, 1, "1.1.0", 2, "real"),
    ]
    assert rows(target, "SELECT kind, json_extract(attributes, '$.version') FROM events") == [
        ("model_activated", "1.1.0")
    ]
    with sqlite3.connect(target) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        telemetry_indexes = {r[1] for r in db.execute("PRAGMA index_list(telemetry)")}
        fks = db.execute("PRAGMA foreign_key_list(model_stats)").fetchall()
    assert {"idx_telemetry_device_id_window_end_ms", "idx_telemetry_received_at"} <= telemetry_indexes
    assert [(f[2], f[3], f[4]) for f in fks] == [("telemetry", "telemetry_id", "id")]
    # Types come from the API's bodies, not from whatever the first batch held (None here).
    assert TABLES["telemetry"].columns["system_temperature_c"] is float
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.sqlite"]


def test_exporting_again_into_the_file_replaces_its_rows_and_adds_new_ones(tmp_path: Path) -> None:
    target = tmp_path / "fleet.sqlite"
    write(target, [window(1), window(2)], [event(7)])
    changed = window(2, temperature=50.0)
    write(target, [window(1), changed, window(3)], [event(7), event(8)])
    assert rows(target, "SELECT id, system_temperature_c FROM telemetry ORDER BY id") == [
        (1, None),
        (2, 50.0),
        (3, None),
    ]
    assert rows(target, "SELECT count(*) FROM model_stats") == [(6,)]
    assert rows(target, "SELECT count(*) FROM events") == [(2,)]
    runs = rows(target, "SELECT controller, json_extract(rows, '$.telemetry') FROM exports ORDER BY id")
    assert runs == [("http://ctl", 2), ("http://ctl", 3)]


def test_a_field_a_newer_controller_sends_becomes_a_column(tmp_path: Path) -> None:
    target = tmp_path / "fleet.sqlite"
    write(target, [{**window(1), "battery_percent": 80.0}])
    assert rows(target, "SELECT battery_percent FROM telemetry") == [(80.0,)]


def test_a_failed_export_leaves_no_file_and_the_previous_one_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "fleet.sqlite"
    with pytest.raises(RuntimeError), ExportFile(target, ["telemetry"]) as out:
        out.add(window_rows(window(1)))
        raise RuntimeError("the controller went away")
    assert list(tmp_path.iterdir()) == []

    write(target, [window(1)])
    before = target.read_bytes()
    with pytest.raises(RuntimeError), ExportFile(target, ["telemetry"]) as out:
        out.add(window_rows(window(2)))
        raise RuntimeError("interrupted")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["fleet.sqlite"]


def test_a_path_it_cannot_write_or_a_file_that_is_not_an_export_is_refused_untouched(tmp_path: Path) -> None:
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("keep me")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE telemetry (name TEXT)")
    cases = {
        tmp_path / "missing" / "fleet.sqlite": "missing does not exist",
        not_sqlite / "fleet.sqlite": "notes.txt is not a folder",
        tmp_path: "is a folder",
        not_sqlite: "not a SQLite file",
        other: "not an EdgeFleet export",
    }
    for target, message in cases.items():
        with pytest.raises(ExportFileError, match=message):
            ExportFile(target, list(GROUPS)).open()
    assert not_sqlite.read_text() == "keep me"
    assert rows(other, "SELECT name FROM sqlite_master") == [("telemetry",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.sqlite"]


def test_rollouts_and_their_devices() -> None:
    rollout = {
        "id": "r1",
        "model": "digits",
        "created_at": 1.0,
        "plan": {"waves": []},
        "devices": [{"device_id": "cam-1", "status": "active", "detail": "", "updated_at": 2.0, "wave": 0}],
    }
    split = rollout_rows(rollout)
    assert split["rollouts"] == [{"id": "r1", "model": "digits", "created_at": 1.0, "plan": {"waves": []}}]
    assert split["rollout_devices"][0] == {"rollout_id": "r1", **rollout["devices"][0]}


def rollout(id_: str, created_at: float, status: str, devices: dict[str, float]) -> dict[str, Any]:
    members = [{"device_id": d, "updated_at": at} for d, at in devices.items()]
    return {"id": id_, "created_at": created_at, "status": status, "devices": members}


def test_the_rollouts_under_way_in_the_range_that_reached_the_devices() -> None:
    rollouts = [
        rollout("old", 10, "succeeded", {"a": 20}),
        rollout("late-change", 10, "failed", {"a": 20, "b": 150}),
        rollout("running", 10, "in_progress", {"a": 20}),
        rollout("after", 300, "in_progress", {"a": 300}),
    ]
    picked = list(select_rollouts(rollouts, set(), 100_000, 200_000))
    assert [r["id"] for r in picked] == ["late-change", "running"]
    for_a = list(select_rollouts(rollouts, {"a"}, None, None))
    assert [r["id"] for r in for_a] == ["old", "late-change", "running", "after"]
    assert [d["device_id"] for d in for_a[1]["devices"]] == ["a"]
    assert [r["id"] for r in select_rollouts(rollouts, {"b"}, None, None)] == ["late-change"]


def test_options() -> None:
    assert parse_tables(None) == ["telemetry", "events", "rollouts", "devices"]
    assert parse_tables(["devices,telemetry", "events"]) == ["telemetry", "events", "devices"]
    for bad in (["telemetry,metrics"], [","]):
        with pytest.raises(CommandError, match="--tables"):
            parse_tables(bad)
    assert parse_range("2h", None, NOW) == (int((NOW - 7200) * 1000), None)
    assert parse_range("2026-12-07T10:00+00:00", "2026-12-07T11:00Z", 0) == (
        int(datetime(2026, 12, 7, 10, tzinfo=UTC).timestamp() * 1000),
        int(datetime(2026, 12, 7, 11, tzinfo=UTC).timestamp() * 1000),
    )
    with pytest.raises(CommandError, match="--since 1h is not before --until 2h"):
        parse_range("1h", "2h", NOW)
    with pytest.raises(CommandError, match="--until 'soon'"):
        parse_range(None, "soon", NOW)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["telemetry", "cam-1"], ["telemetry", "show", "cam-1"]),
        (
            ["--json", "telemetry", "--limit", "3", "cam-1"],
            ["--json", "telemetry", "show", "--limit", "3", "cam-1"],
        ),
        (["--url", "u", "telemetry", "cam-1"], ["--url", "u", "telemetry", "show", "cam-1"]),
        (["telemetry", "export", "--out", "f"], ["telemetry", "export", "--out", "f"]),
        (["telemetry", "show", "export"], ["telemetry", "show", "export"]),
        (["telemetry"], ["telemetry"]),
        (["telemetry", "--help"], ["telemetry", "--help"]),
        (["events", "telemetry"], ["events", "telemetry"]),
    ],
)
def test_telemetry_device_still_shows_the_devices_windows(argv: list[str], expected: list[str]) -> None:
    assert with_default_action(argv) == expected
