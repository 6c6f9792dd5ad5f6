"""The schema history: a database made before migrations is adopted with its rows, a new one gets
the whole schema, and one migrated by a newer controller is refused and left alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from edgefleet_proto import fleet_pb2

from controller import migrations
from controller.migrations import NewerDatabase
from controller.store import Store, database_url
from controller.telemetry import TelemetryStore
from tests.unit.controller.helpers import Parts

BEFORE_MIGRATIONS = Path(__file__).with_name("schema_before_migrations.sql")


def old_database(path: Path, with_late_columns: bool) -> None:
    """A database as the controller made it before migrations, with a device, a window and a rollout.
    Without ``with_late_columns`` it also lacks the columns that controller added at start
    (by ALTER TABLE) to databases older still."""
    conn = sqlite3.connect(path)
    conn.executescript(BEFORE_MIGRATIONS.read_text())
    if with_late_columns:
        conn.executescript(
            "ALTER TABLE telemetry ADD COLUMN shadows TEXT NOT NULL DEFAULT '[]';"
            "ALTER TABLE telemetry ADD COLUMN tenants TEXT NOT NULL DEFAULT '[]';"
            "ALTER TABLE rollout_runs ADD COLUMN phase TEXT NOT NULL DEFAULT 'live';"
            "ALTER TABLE rollout_members ADD COLUMN shadow_set_at REAL;"
        )
    conn.execute(
        "INSERT INTO devices (device_id, tags, password_hash, created_at) VALUES ('d', '[]', 'h', 1.5)"
    )
    conn.execute(
        "INSERT INTO telemetry (device_id, received_at, seq, window_start_ms, window_end_ms, system, models,"
        " outbox_dropped) VALUES ('d', 1.0, 1, 0, 10, '{}', '[]', 0)"
    )
    conn.execute(
        "INSERT INTO rollouts (id, model, version, tenant, digest, created_at) VALUES ('r', 'm', '1', 't', 'x', 2)"
    )
    conn.execute(
        "INSERT INTO rollout_runs (rollout_id, plan, state, updated_at) VALUES ('r', '{}', 'running', 2)"
    )
    conn.commit()
    conn.close()


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def revision(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


@pytest.mark.parametrize("with_late_columns", [True, False], ids=["as-last-made", "older"])
def test_a_database_from_before_migrations_is_adopted_with_its_rows(
    tmp_path: Path, with_late_columns: bool
) -> None:
    path = tmp_path / "controller.db"
    old_database(path, with_late_columns)
    store = Store(path)
    assert revision(path) == migrations.head()
    assert {"shadows", "tenants"} <= columns(path, "telemetry")
    assert "phase" in columns(path, "rollout_runs") and "shadow_set_at" in columns(path, "rollout_members")
    assert store.query("SELECT device_id, created_at FROM devices") == [{"device_id": "d", "created_at": 1.5}]
    assert store.query_one("SELECT phase, state FROM rollout_runs") == {"phase": "live", "state": "running"}
    telemetry = TelemetryStore(store)
    (old,) = telemetry.telemetry("d")
    assert old.seq == 1 and old.shadows == [] and old.tenants == []
    # The unique key of a window survived: a resend of the old window is recognised.
    assert not telemetry.ingest_telemetry("d", fleet_pb2.Telemetry(device_id="d", seq=1), received_at=3.0)
    assert telemetry.ingest_telemetry("d", fleet_pb2.Telemetry(device_id="d", seq=2), received_at=3.0)
    store.close()
    # A second start finds it current and changes nothing.
    Store(path).close()
    assert revision(path) == migrations.head()


def test_a_new_database_gets_the_whole_schema_at_the_newest_revision(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    assert revision(parts.settings.db_path) == migrations.head()
    old = sqlite3.connect(":memory:")
    old.executescript(BEFORE_MIGRATIONS.read_text())
    before = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    with sqlite3.connect(parts.settings.db_path) as conn:
        now = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    assert before - now == set(), "every table and index of the old schema is there"


def test_a_database_migrated_by_a_newer_controller_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "controller.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0999'")
    before = path.read_bytes()
    with pytest.raises(NewerDatabase) as refused:
        Store(path)
    message = str(refused.value)
    assert "0999" in message and migrations.head() in message and "newer" in message
    assert revision(path) == "0999" and path.read_bytes() == before


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_postgresql_database_migrated_by_a_newer_controller_is_refused(store_url: str) -> None:
    store = Store(store_url)
    store.execute("UPDATE alembic_version SET version_num = '0999'")
    store.close()
    with pytest.raises(NewerDatabase) as refused:
        Store(store_url)
    assert "0999" in str(refused.value) and migrations.head() in str(refused.value)
    # Read without migrating: the refused database is left at its revision.
    check = sa.create_engine(database_url(store_url))
    with check.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0999"
    check.dispose()
