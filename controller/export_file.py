"""The export file: fleet data in one self-contained SQLite file, written with sqlite-utils, for
Datasette, pandas or a support ticket, whatever database the controller runs on.

Tables, their keys, and what they hold (columns as the API's response bodies name them):

- ``telemetry`` (``id``): one telemetry window, its system stats flattened into ``system_*``;
  ``model_stats``, ``tenant_stats`` and ``shadow_stats`` (``telemetry_id``, ``position``): the
  window's per-model, per-tenant and shadow stats, one row each, keyed to the window;
- ``events`` (``id``): device events, their attributes as JSON;
- ``devices`` (``device_id``): registration, tags, last reported state (JSON);
- ``rollouts`` (``id``) and ``rollout_devices`` (``rollout_id``, ``device_id``);
- ``exports``: one row per export into the file (when, from which controller, what was asked).

Rows are keyed by the controller's own ids, so an export run again into the same file replaces
the rows it had and adds the new ones; one file holds one controller's data. The file is
written atomically: into a temporary file beside the target (a copy of the target when it
exists), renamed over the target only once complete, so a failed export leaves the target as it
was and no partial file. Rollback journal, not WAL: the file is the whole database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlite_utils import Database

from controller.api.export_schemas import EventExportRow, TelemetryExportRow
from controller.api.rollout_schemas import RolloutDevicePublic, RolloutPublic
from controller.api.schemas import (
    DevicePublic,
    ModelStatsPublic,
    ShadowStatsPublic,
    SystemStatsPublic,
    TenantStatsPublic,
)
from controller.files import fsync_dir

# What `--tables` names; each brings the tables listed beside it.
GROUPS: dict[str, tuple[str, ...]] = {
    "telemetry": ("telemetry", "model_stats", "tenant_stats", "shadow_stats"),
    "events": ("events",),
    "rollouts": ("rollouts", "rollout_devices"),
    "devices": ("devices",),
}
BATCH = 500
# A window's nested lists: the child table each goes to, and the body of its rows.
_CHILDREN: dict[str, tuple[str, type[BaseModel]]] = {
    "models": ("model_stats", ModelStatsPublic),
    "tenants": ("tenant_stats", TenantStatsPublic),
    "shadows": ("shadow_stats", ShadowStatsPublic),
}


class ExportFileError(Exception):
    """The export file cannot be written (the message names the path and why)."""


def _column_type(annotation: Any) -> type:
    """The SQLite column type for a response field: numbers and text as themselves, bools as
    integers, anything nested (lists, objects) as JSON text."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        present = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = present[0] if len(present) == 1 else str
    if annotation in (int, bool):
        return int
    if annotation is float:
        return float
    return str


def _columns(model: type[BaseModel], skip: Iterable[str] = (), prefix: str = "") -> dict[str, type]:
    skipped = set(skip)
    return {
        prefix + name: _column_type(info.annotation)
        for name, info in model.model_fields.items()
        if name not in skipped
    }


@dataclass(frozen=True)
class _Table:
    name: str
    columns: dict[str, type]
    pk: str | tuple[str, ...]
    foreign_keys: tuple[tuple[str, str, str], ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()


def _child(name: str, model: type[BaseModel], indexes: tuple[tuple[str, ...], ...]) -> _Table:
    return _Table(
        name,
        {"telemetry_id": int, "position": int, **_columns(model)},
        ("telemetry_id", "position"),
        (("telemetry_id", "telemetry", "id"),),
        indexes,
    )


# The file's schema, derived from the API's response bodies (one definition of each field).
TABLES: dict[str, _Table] = {
    t.name: t
    for t in (
        _Table(
            "telemetry",
            {
                **_columns(TelemetryExportRow, skip=[*_CHILDREN, "system"]),
                **_columns(SystemStatsPublic, prefix="system_"),
            },
            "id",
            indexes=(("device_id", "window_end_ms"), ("window_end_ms",), ("received_at",)),
        ),
        _child("model_stats", ModelStatsPublic, (("model_name", "model_version"),)),
        _child("tenant_stats", TenantStatsPublic, (("tenant",),)),
        _child("shadow_stats", ShadowStatsPublic, (("candidate_model_name", "candidate_model_version"),)),
        _Table(
            "events",
            _columns(EventExportRow),
            "id",
            indexes=(("device_id", "at_ms"), ("at_ms",), ("kind",)),
        ),
        _Table("devices", _columns(DevicePublic), "device_id"),
        _Table("rollouts", _columns(RolloutPublic, skip=["devices"]), "id", indexes=(("created_at",),)),
        _Table(
            "rollout_devices",
            {"rollout_id": str, **_columns(RolloutDevicePublic)},
            ("rollout_id", "device_id"),
            (("rollout_id", "rollouts", "id"),),
            (("device_id",),),
        ),
    )
}


def window_rows(window: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A window as the API gives it, as rows of ``telemetry`` and its child tables."""
    row = {k: v for k, v in window.items() if k not in _CHILDREN and k != "system"}
    row |= {f"system_{k}": v for k, v in (window.get("system") or {}).items()}
    rows: dict[str, list[dict[str, Any]]] = {"telemetry": [row]}
    for key, (table, _) in _CHILDREN.items():
        rows[table] = [
            {"telemetry_id": window["id"], "position": i, **stats}
            for i, stats in enumerate(window.get(key, []))
        ]
    return rows


def rollout_rows(rollout: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A rollout as the API gives it, as a row of ``rollouts`` and its devices' rows."""
    return {
        "rollouts": [{k: v for k, v in rollout.items() if k != "devices"}],
        "rollout_devices": [{"rollout_id": rollout["id"], **d} for d in rollout.get("devices", [])],
    }


@dataclass
class ExportFile:
    """An export being written: :meth:`open`, ``add`` rows, then :meth:`commit` (renames it into
    place) or :meth:`discard` (removes the temporary file); as a context manager, an exception
    discards."""

    target: Path
    groups: Sequence[str]
    counts: dict[str, int] = field(default_factory=dict)
    # What was asked, kept in the file's `exports` table (controller, tables, devices, range).
    run: dict[str, Any] = field(default_factory=dict)
    _tmp: Path | None = field(default=None, init=False)
    _db: Database | None = field(default=None, init=False)

    def __enter__(self) -> ExportFile:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def open(self) -> None:
        target = self.target
        if target.is_dir():
            raise ExportFileError(
                f"{target} is a folder: name the file to write, e.g. {target / 'fleet.sqlite'}"
            )
        if not target.parent.is_dir():
            why = "is not a folder" if target.parent.exists() else "does not exist"
            raise ExportFileError(f"cannot write {target}: {target.parent} {why}")
        if target.exists() and not os.access(target, os.W_OK):
            raise ExportFileError(f"cannot write {target}: the file is read-only")
        try:
            fd, name = _mkstemp(target)
        except OSError as exc:
            raise ExportFileError(f"cannot write {target}: {exc.strerror or exc}") from None
        os.close(fd)
        self._tmp = Path(name)
        try:
            if target.exists():
                _copy_database(target, self._tmp)
            self._db = Database(self._tmp)
            # A single portable file: never WAL (a copy of a WAL database may be one).
            self._db.disable_wal()
            self._create()
        except BaseException:
            self.discard()
            raise

    def _create(self) -> None:
        db = self._require()
        wanted = [TABLES[t] for g in self.groups for t in GROUPS[g]]
        for table in wanted:
            existing = db.table(table.name)
            if existing.exists():
                pks = tuple(existing.pks)
                if pks != (table.pk if isinstance(table.pk, tuple) else (table.pk,)):
                    raise ExportFileError(
                        f"{self.target} has a table {table.name!r} keyed by {', '.join(pks)}: not an EdgeFleet "
                        "export; name another file"
                    )
                continue
            existing.create(table.columns, pk=table.pk, foreign_keys=list(table.foreign_keys))
            for columns in table.indexes:
                existing.create_index(list(columns), if_not_exists=True)
        db.table("exports").create(
            {
                "id": int,
                "exported_at": float,
                "controller": str,
                "tables": str,
                "devices": str,
                "since_ms": int,
                "until_ms": int,
                "rows": str,
            },
            pk="id",
            if_not_exists=True,
        )

    def _require(self) -> Database:
        if self._db is None:
            raise RuntimeError("the export file is not open")
        return self._db

    def add(self, rows: Mapping[str, list[dict[str, Any]]]) -> None:
        """Rows by table; a row already in the file (same key) is replaced."""
        db = self._require()
        try:
            for name, batch in rows.items():
                if not batch:
                    continue
                # alter: a field a newer controller sends becomes a column rather than an error.
                db.table(name).insert_all(
                    batch, pk=TABLES[name].pk, replace=True, alter=True, batch_size=BATCH
                )
                self.counts[name] = self.counts.get(name, 0) + len(batch)
        except sqlite3.Error as exc:
            raise ExportFileError(f"cannot write {self.target}: {exc}") from None

    def record(self, run: Mapping[str, Any]) -> None:
        """What was asked, for the file's ``exports`` row of this run."""
        self.run = dict(run)

    def commit(self) -> None:
        """Record the run and move the file into place."""
        db, tmp = self._require(), self._tmp
        assert tmp is not None
        try:
            record = {"exported_at": time.time(), "rows": json.dumps(self.counts), **self.run}
            db.table("exports").insert(record, alter=True)
            db.conn.commit()
            db.close()
            self._db = None
            mode = self.target.stat().st_mode & 0o777 if self.target.exists() else 0o666 & ~_umask()
            with tmp.open("rb+") as f:
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, self.target)
            self._tmp = None
            fsync_dir(self.target.parent)
        except (OSError, sqlite3.Error) as exc:
            self.discard()
            raise ExportFileError(f"cannot write {self.target}: {exc}") from None

    def discard(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._tmp is not None:
            for leftover in (self._tmp, Path(f"{self._tmp}-journal")):
                leftover.unlink(missing_ok=True)
            self._tmp = None


def _mkstemp(target: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)


def _copy_database(source: Path, into: Path) -> None:
    """A consistent copy of the SQLite file ``source`` (with anything in its WAL), or a clear error."""
    try:
        reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            writer = sqlite3.connect(into)
            try:
                reader.backup(writer)
            finally:
                writer.close()
        finally:
            reader.close()
    except sqlite3.DatabaseError as exc:
        raise ExportFileError(
            f"{source} exists and is not a SQLite file ({exc}): name another file"
        ) from None


def _umask() -> int:
    # os.umask only reads by setting; a CLI process has one thread here.
    current = os.umask(0)
    os.umask(current)
    return current
