"""``edgefleet telemetry``: a device's recent windows (``show``), and fleet data exported into a
self-contained SQLite file for offline analysis (``export``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgefleet_proto.topics import _DEVICE_ID as DEVICE_ID
from rich.console import RenderableType
from rich.text import Text

from controller import cli_output, cli_progress, cli_views
from controller.cli import CommandError, _call, _print
from controller.cli_output import table

ACTIONS = ("show", "export")
# Options of `telemetry show` and the global ones that take a value (for with_default_action).
_VALUED = ("--url", "--token", "--limit")
TABLE_GROUPS = ("telemetry", "events", "rollouts", "devices")
PAGE_ROWS = 2000

EXPORT_HELP = """\
Write fleet data into one SQLite file (for Datasette, pandas, a support ticket), whatever
database the controller runs on:

  telemetry        one row per window (system stats as system_* columns), with model_stats,
                   tenant_stats and shadow_stats rows keyed to it (telemetry_id, position)
  events           device events (attributes as JSON)
  rollouts         rollouts and rollout_devices
  devices          the devices, their tags and last reported state
  exports          one row per export into the file: when, from where, what was asked

--since and --until read the devices' clocks (when a window ended, when an event happened);
rollouts are those under way in the range, devices all (or --device). Rows keep the
controller's ids as keys: exporting again into the same file replaces what it had and adds the
rest, never duplicates. The file is written beside the target and renamed over it when
complete; a failed export leaves no file and the previous one as it was.

  edgefleet telemetry export --out fleet.sqlite --since 2h
  edgefleet telemetry export --out cam.sqlite --device cam-north --since 2026-12-07T08:00 --until 2026-12-07T12:00
  datasette fleet.sqlite    # or: sqlite3 fleet.sqlite 'SELECT device_id, count(*) FROM telemetry GROUP BY 1'
"""


def with_default_action(argv: Sequence[str]) -> list[str]:
    """``edgefleet telemetry DEVICE`` as it was before ``export`` came: ``telemetry show DEVICE``."""
    args = list(argv)
    command = _first_positional(args, 0)
    if command is None or args[command] != "telemetry":
        return args
    action = _first_positional(args, command + 1)
    if action is None or args[action] in ACTIONS or {"-h", "--help"} & set(args[command + 1 : action]):
        return args
    return [*args[: command + 1], "show", *args[command + 1 :]]


def _first_positional(args: Sequence[str], start: int) -> int | None:
    i = start
    while i < len(args):
        if args[i] in _VALUED:
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            return i
    return None


def cmd_telemetry_show(args: argparse.Namespace) -> int:
    _print(
        _call(args, "GET", f"/v1/devices/{args.device}/telemetry", params={"limit": args.limit}),
        cli_views.telemetry,
    )
    return 0


# -- export -----------------------------------------------------------------------


def parse_tables(texts: Sequence[str] | None) -> list[str]:
    """``--tables telemetry,events`` (repeatable) as table groups in a fixed order; default all."""
    if not texts:
        return list(TABLE_GROUPS)
    named = {t.strip() for text in texts for t in text.split(",") if t.strip()}
    unknown = sorted(named - set(TABLE_GROUPS))
    if unknown or not named:
        raise CommandError(
            f"--tables {','.join(texts)!r}: name some of {','.join(TABLE_GROUPS)}"
            + (f" (not {', '.join(unknown)})" if unknown else "")
        )
    return [t for t in TABLE_GROUPS if t in named]


def parse_range(since: str | None, until: str | None, now: float) -> tuple[int | None, int | None]:
    """``--since``/``--until`` as epoch milliseconds; refused when the range holds no time."""
    bounds: list[int | None] = []
    for option, text in (("--since", since), ("--until", until)):
        if text is None:
            bounds.append(None)
            continue
        try:
            bounds.append(int(cli_output.parse_since(text, now) * 1000))
        except ValueError as exc:
            raise CommandError(f"{option} {exc}") from None
    since_ms, until_ms = bounds
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise CommandError(
            f"--since {since} is not before --until {until}: the range holds no time "
            f"({cli_output.local_time(since_ms / 1000)} to {cli_output.local_time(until_ms / 1000)})"
        )
    return since_ms, until_ms


def select_rollouts(
    rollouts: Iterable[dict[str, Any]], devices: set[str], since_ms: int | None, until_ms: int | None
) -> Iterator[dict[str, Any]]:
    """The rollouts under way in the range (made before its end; running, or changed after its
    start) that reached one of ``devices`` (any when empty), with those devices only."""
    for rollout in rollouts:
        members = [d for d in rollout["devices"] if not devices or d["device_id"] in devices]
        if devices and not members:
            continue
        if until_ms is not None and rollout["created_at"] * 1000 >= until_ms:
            continue
        last_change = max([rollout["created_at"], *(d["updated_at"] for d in rollout["devices"])])
        if since_ms is not None and rollout["status"] != "in_progress" and last_change * 1000 < since_ms:
            continue
        yield {**rollout, "devices": members}


def _pages(
    args: argparse.Namespace, table_: str, params: dict[str, Any]
) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
    """The export endpoint's pages of ``table_``: (rows, total of the range on the first page)."""
    cursor: str | None = None
    while True:
        page = _call(
            args,
            "GET",
            f"/v1/export/{table_}",
            params={**params, "limit": PAGE_ROWS, **({"cursor": cursor} if cursor else {})},
        )
        yield page["rows"], page["total"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


def cmd_telemetry_export(args: argparse.Namespace) -> int:
    # Imported here: sqlite-utils and the API's schemas are for this command only.
    from controller.export_file import ExportFile, ExportFileError, rollout_rows, window_rows

    groups = parse_tables(args.tables)
    since_ms, until_ms = parse_range(args.since, args.until, time.time())
    devices = sorted(set(args.device or []))
    malformed = [d for d in devices if not DEVICE_ID.fullmatch(d)]
    if malformed:
        raise CommandError(f"--device {malformed[0]!r} is not a device id (letters, digits, '_', '.', '-')")
    for device_id in devices:
        _call(args, "GET", f"/v1/devices/{device_id}")  # unknown: the API's 404 names it
    target = Path(args.out)
    params: dict[str, Any] = {"device": devices}
    params |= {k: v for k, v in (("since_ms", since_ms), ("until_ms", until_ms)) if v is not None}
    try:
        with ExportFile(target, groups) as out, cli_progress.rows() as bars:
            for group in groups:
                bar = bars.add_task(group, total=None)
                if group in ("telemetry", "events"):
                    for rows, total in _pages(args, group, params):
                        if total is not None:
                            bars.update(bar, total=total)
                        out.add(_by_table(rows, window_rows) if group == "telemetry" else {"events": rows})
                        bars.advance(bar, len(rows))
                elif group == "devices":
                    listed = _call(args, "GET", "/v1/devices")
                    chosen = [d for d in listed if not devices or d["device_id"] in devices]
                    bars.update(bar, total=len(chosen))
                    out.add({"devices": chosen})
                    bars.advance(bar, len(chosen))
                else:
                    listed = _call(args, "GET", "/v1/rollouts")
                    chosen = list(select_rollouts(listed, set(devices), since_ms, until_ms))
                    bars.update(bar, total=len(chosen))
                    out.add(_by_table(chosen, rollout_rows))
                    bars.advance(bar, len(chosen))
            out.record(
                {
                    "controller": args.url,
                    "tables": ",".join(groups),
                    "devices": ",".join(devices),
                    "since_ms": since_ms,
                    "until_ms": until_ms,
                }
            )
    except ExportFileError as exc:
        raise CommandError(str(exc)) from None
    _print({"path": str(target), "rows": out.counts}, _export_summary)
    return 0


def _by_table(
    items: Iterable[dict[str, Any]], split: Callable[[dict[str, Any]], dict[str, list[dict[str, Any]]]]
) -> dict[str, list[dict[str, Any]]]:
    """The rows of many items (windows, rollouts) gathered by table, to be written in batches."""
    gathered: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        for name, rows in split(item).items():
            gathered.setdefault(name, []).extend(rows)
    return gathered


def _export_summary(data: dict[str, Any]) -> Iterable[RenderableType]:
    yield Text(f"written to {data['path']}")
    yield table([{"table": name, "rows": count} for name, count in data["rows"].items()], ["table", "rows"])


def add_commands(commands: Any, remote: argparse.ArgumentParser) -> None:
    telemetry = commands.add_parser(
        "telemetry",
        help="a device's telemetry windows, newest first; export fleet data into a SQLite file",
        description="`edgefleet telemetry DEVICE` is `edgefleet telemetry show DEVICE`.",
    ).add_subparsers(dest="action", required=True)
    show = telemetry.add_parser(
        "show", parents=[remote], help="a device's telemetry windows, newest first (also: telemetry DEVICE)"
    )
    show.add_argument("device", help="device id")
    show.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    show.set_defaults(func=cmd_telemetry_show)

    export = telemetry.add_parser(
        "export",
        parents=[remote],
        help="write telemetry, events, rollouts and devices into a SQLite file for offline analysis",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--out", required=True, metavar="FILE", help="the SQLite file to write (or add to)")
    export.add_argument(
        "--device",
        action="append",
        metavar="ID",
        help="only this device (repeat for several; default: every device)",
    )
    export.add_argument(
        "--since",
        metavar="WHEN",
        help="from this device time: ISO 8601 (local unless it names a zone) or how long ago (90s, 15m, 2h, 7d)",
    )
    export.add_argument("--until", metavar="WHEN", help="up to this device time (excluded), as --since")
    export.add_argument(
        "--tables",
        action="append",
        metavar="LIST",
        help=f"comma-separated, of {','.join(TABLE_GROUPS)} (default: all)",
    )
    export.set_defaults(func=cmd_telemetry_export)
