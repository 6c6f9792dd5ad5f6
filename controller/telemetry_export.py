"""Stored telemetry windows and device events read page by page, for an export of a time range
(``edgefleet telemetry export``) however many rows it holds.

Rows come device by device (in device id order), and within a device in the device's own time
order (a window's end, an event's ``at_ms``), then id: the order of the ``telemetry_newest`` and
``events_newest`` indexes, so each device's part of a range is one index range scan on SQLite
and PostgreSQL alike, whatever the table holds outside it. A page ends with a cursor naming
the last row's (device, time, id); the next page starts after it, so rows stored meanwhile
neither shift nor repeat a page.

The range is read on the devices' clocks because that is when a window was measured; a
window delivered a week late by the agent's outbox is found at its own time.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from controller.errors import DeviceNotFound, InvalidInputError
from controller.store import Store
from controller.telemetry import EventRecord, TelemetryRecord, event_record, window_record

Table = Literal["telemetry", "events"]
DEFAULT_PAGE = 1000
MAX_PAGE = 5000
# Devices whose ids are read from the devices table at a time while walking the fleet.
_DEVICE_BATCH = 500
# At most this many devices named in one request (SQLite allows 32766 parameters a statement).
MAX_DEVICES = 1000

R = TypeVar("R", TelemetryRecord, EventRecord)


@dataclass(frozen=True)
class _Source(Generic[R]):
    table: Table
    time_column: str
    record: Callable[[dict[str, Any]], R]


_SOURCES: dict[str, _Source[Any]] = {
    "telemetry": _Source("telemetry", "window_end_ms", window_record),
    "events": _Source("events", "at_ms", event_record),
}


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after this row of this device."""

    device_id: str
    time_ms: int
    id: int

    def encode(self) -> str:
        raw = json.dumps([self.device_id, self.time_ms, self.id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            device_id, time_ms, id_ = json.loads(raw)
            if not (isinstance(device_id, str) and type(time_ms) is int and type(id_) is int):
                raise ValueError("wrong types")
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"cursor {text[:40]!r} is not one this API returned ({exc}): pass next_cursor as it came"
            ) from None
        return cls(device_id, time_ms, id_)


@dataclass(frozen=True)
class Range:
    """Which rows: of these devices (all when empty), with a device time in [since_ms, until_ms)."""

    devices: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None

    def check(self, store: Store) -> None:
        """Refuse an empty or inverted time range and devices the controller never registered."""
        if self.since_ms is not None and self.until_ms is not None and self.since_ms >= self.until_ms:
            raise InvalidInputError(
                f"since_ms {self.since_ms} is not before until_ms {self.until_ms}: the range holds no time"
            )
        if len(self.devices) > MAX_DEVICES:
            raise InvalidInputError(f"{len(self.devices)} devices named; at most {MAX_DEVICES} at once")
        if not self.devices:
            return
        marks = ",".join("?" * len(self.devices))
        # Revoked devices count: their history stays in the store and can be exported.
        found = {
            r["device_id"]
            for r in store.query(f"SELECT device_id FROM devices WHERE device_id IN ({marks})", self.devices)
        }
        unknown = sorted(set(self.devices) - found)
        if unknown:
            raise DeviceNotFound(f"unknown device{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")

    def time_filter(self, column: str) -> tuple[str, list[Any]]:
        sql, params = "", []
        if self.since_ms is not None:
            sql += f" AND {column} >= ?"
            params.append(self.since_ms)
        if self.until_ms is not None:
            sql += f" AND {column} < ?"
            params.append(self.until_ms)
        return sql, params


@dataclass(frozen=True)
class Page(Generic[R]):
    rows: list[R]
    # None once the range is exhausted.
    next_cursor: Cursor | None
    # Rows in the whole range, counted for the first page only (for a progress bar).
    total: int | None


def read_page(
    store: Store, table: Table, where: Range, cursor: Cursor | None = None, limit: int = DEFAULT_PAGE
) -> Page[Any]:
    """Up to ``limit`` rows of ``table`` in ``where`` after ``cursor``."""
    where.check(store)
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit {limit}: a page holds 1 to {MAX_PAGE} rows")
    source = _SOURCES[table]
    rows: list[Any] = []
    for device_id in _devices(store, where.devices, cursor.device_id if cursor else None):
        after = cursor if cursor is not None and cursor.device_id == device_id else None
        rows += _device_rows(store, source, device_id, where, after, limit - len(rows))
        if len(rows) == limit:
            last = rows[-1]
            time_ms = getattr(last, source.time_column)
            return Page(rows, Cursor(last.device_id, time_ms, last.id), _total(store, source, where, cursor))
    return Page(rows, None, _total(store, source, where, cursor))


def _devices(store: Store, named: Sequence[str], start: str | None) -> Iterator[str]:
    """The devices to read, in id order, from ``start`` (included) on."""
    if named:
        yield from (d for d in sorted(set(named)) if start is None or d >= start)
        return
    after, inclusive = start, True
    while True:
        op = ">=" if inclusive and after is not None else ">"
        batch = store.query(
            "SELECT device_id FROM devices"
            + (f" WHERE device_id {op} ?" if after is not None else "")
            + f" ORDER BY device_id LIMIT {_DEVICE_BATCH}",
            (after,) if after is not None else (),
        )
        yield from (r["device_id"] for r in batch)
        if len(batch) < _DEVICE_BATCH:
            return
        after, inclusive = batch[-1]["device_id"], False


def _device_rows(
    store: Store, source: _Source[Any], device_id: str, where: Range, after: Cursor | None, limit: int
) -> list[Any]:
    column = source.time_column
    sql = f"SELECT * FROM {source.table} WHERE device_id = ?"
    params: list[Any] = [device_id]
    time_sql, time_params = where.time_filter(column)
    sql += time_sql
    params += time_params
    if after is not None:
        # A row value, not the spelled-out OR: SQLite makes only the row value an index bound.
        sql += f" AND ({column}, id) > (?, ?)"
        params += [after.time_ms, after.id]
    sql += f" ORDER BY {column}, id LIMIT ?"
    params.append(limit)
    return [source.record(r) for r in store.query(sql, params)]


def _total(store: Store, source: _Source[Any], where: Range, cursor: Cursor | None) -> int | None:
    if cursor is not None:
        return None
    time_sql, params = where.time_filter(source.time_column)
    if where.devices:
        marks = ",".join("?" * len(where.devices))
        sql = f"SELECT COUNT(*) AS n FROM {source.table} WHERE device_id IN ({marks})"
        params = [*where.devices, *params]
    else:
        sql = f"SELECT COUNT(*) AS n FROM {source.table} WHERE 1 = 1"
    row = store.query_one(sql + time_sql, params)
    return int(row["n"]) if row is not None else 0
