"""How the operator CLI shows what the API answered: tables (rich) for people, the API's
JSON with ``--json`` for scripts.

A command hands its data and, optionally, a view (a function building rich renderables
from the data) to :func:`emit`; without a view a generic one lays out lists of objects
as tables and objects as key/value tables. Timestamps (``*_at``, ``at``, ``last_seen``,
``not_after`` in seconds; ``*_ms`` epoch milliseconds) are shown as ISO 8601 in local time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

View = Callable[[Any], RenderableType | Iterable[RenderableType]]

_json_mode = False
_SECONDS_KEYS = {"at", "last_seen", "not_after", "since"}
# Epoch milliseconds are past 1e11 (1973); no duration in ms here comes near it.
_EPOCH_MS = 1e11
_MAX_COLUMNS = 9


def configure(json_mode: bool) -> None:
    global _json_mode
    _json_mode = json_mode


def json_mode() -> bool:
    return _json_mode


def stdout() -> Console:
    # Built per call: tests and pipes swap sys.stdout, and a table is drawn once.
    return Console(file=sys.stdout, soft_wrap=False)


def stderr() -> Console:
    return Console(file=sys.stderr, stderr=True)


def emit(data: Any, view: View | None = None) -> None:
    """Print ``data``: its JSON with ``--json``, else what ``view`` (or the generic view) makes of it."""
    if _json_mode:
        print(json.dumps(data, indent=2))
        return
    made = (view or generic)(data)
    console = stdout()
    if isinstance(made, str | Text) or not isinstance(made, Iterable):
        console.print(made)
    else:
        console.print(Group(*made))


def local_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """A point in time as people write it: ISO 8601 (local time unless it names a zone),
    or a duration ago (``90s``, ``15m``, ``2h``, ``7d``); epoch seconds."""
    text = text.strip()
    if text and text[-1] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * _UNITS[text[-1]]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r}: give a time (2026-12-07T13:30, local unless it ends in a zone) or how long ago (15m, 2h, 7d)"
        ) from None
    return (when if when.tzinfo else when.astimezone()).timestamp()


def is_time(key: str, value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return False
    if key.endswith("_ms"):
        return value >= _EPOCH_MS
    return key.endswith("_at") or key in _SECONDS_KEYS


def cell(key: str, value: Any) -> str:
    """One value as table text."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_time(key, value):
        return local_time(value / 1000 if key.endswith("_ms") else value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and (key == "digest" or key.endswith("_digest")) and len(value) > 16:
        return value[:12] + "…"
    if isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            return ", ".join(str(v) for v in value) or "-"
        return f"{len(value)} items"
    if isinstance(value, dict):
        text = ", ".join(f"{k}={cell(k, v)}" for k, v in value.items())
        return text if len(text) <= 80 else text[:79] + "…"
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Table:
    """Rows of objects as a table; ``columns`` picks and orders the keys shown."""
    if columns is None:
        columns = _scalar_columns(rows)
    out = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        out.add_column((headers or {}).get(column, _header(column, rows)), overflow="fold")
    for row in rows:
        out.add_row(*(cell(c, _lookup(row, c)) for c in columns))
    if not rows:
        out.add_row(*(["(none)"] + [""] * (len(columns) - 1)))
    return out


def _header(column: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The column's key in words; a time in epoch milliseconds is shown as a time, so no "ms"."""
    if column.endswith("_ms") and any(is_time(column, _lookup(row, column)) for row in rows):
        column = column.removesuffix("_ms")
    return column.replace("_", " ")


def _lookup(row: Mapping[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _scalar_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows[:20]:
        for key, value in row.items():
            if key not in columns and not (isinstance(value, dict | list) and value):
                columns.append(key)
    return columns[:_MAX_COLUMNS] or ["value"]


def record(data: Mapping[str, Any], title: str | None = None, skip: Iterable[str] = ()) -> Table:
    """One object as a key/value table; nested lists of objects become tables of their own."""
    out = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    out.add_column(style="bold")
    out.add_column(overflow="fold")
    skipped = set(skip)
    for key, value in data.items():
        if key in skipped:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.add_row(key.replace("_", " "), table(value))
        elif isinstance(value, dict) and value and any(isinstance(v, dict | list) for v in value.values()):
            out.add_row(key.replace("_", " "), record(value))
        else:
            out.add_row(key.replace("_", " "), cell(key, value))
    return out


def generic(data: Any) -> RenderableType:
    if isinstance(data, list):
        if all(isinstance(r, dict) for r in data):
            return table(data)
        return Text("\n".join(str(v) for v in data))
    if isinstance(data, dict):
        return record(data)
    return Text(str(data))
