"""``edgefleet groups|windows``: device groups and maintenance windows over REST (changes: operator)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType

from controller.cli import CommandError, _call, _print
from controller.cli_output import record, table

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` or ``1d`` as seconds."""
    found = _DURATION.match(text.strip().lower())
    if not found:
        raise CommandError(f"--duration {text!r}: use a number of seconds or e.g. 30m, 2h, 1d")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- views ----------------------------------------------------------------------


def _query(group: dict[str, Any]) -> str:
    q = group.get("query")
    if not q:
        return "-"
    parts = [f"tags {', '.join(q['tags'])}"] if q.get("tags") else []
    if q.get("profile"):
        parts.append(f"profile {q['profile']}")
    return " and ".join(parts)


def _window_rows(windows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **w,
            "for": f"group {w['group']}" if w.get("group") else f"device {w['device_id']}",
            "duration": _duration(w["duration_s"]),
            "state": "open" if w["open"] else f"opens {w['next_open']}",
        }
        for w in windows
    ]


def _windows_table(windows: list[dict[str, Any]], title: str | None = None) -> RenderableType:
    return table(
        _window_rows(windows),
        ["id", "for", "cron", "duration", "timezone", "state", "closes_at"],
        title=title,
    )


def groups_list(groups: list[dict[str, Any]]) -> RenderableType:
    rows = [
        {
            **g,
            "query": _query(g),
            "devices": len(g["devices"]),
            "windows": "; ".join(f"{w['cron']} {w['timezone']}" for w in g["windows"]) or "-",
        }
        for g in groups
    ]
    return table(rows, ["name", "kind", "devices", "query", "windows", "description"])


def group(data: dict[str, Any]) -> Iterable[RenderableType]:
    yield record({**data, "query": _query(data)}, title=f"group {data['name']}", skip=("windows", "devices"))
    yield table([{"device_id": d} for d in data["devices"]], ["device_id"], title="devices")
    yield _windows_table(data["windows"], title="maintenance windows")


def windows_list(windows: list[dict[str, Any]]) -> RenderableType:
    return _windows_table(windows)


def device_maintenance(data: dict[str, Any]) -> Iterable[RenderableType]:
    state = "open: a rollout may update it now" if data["open"] else data["reason"]
    yield record({"device_id": data["device_id"], "window": state})
    yield _windows_table(data["windows"], title="windows it follows")


# -- commands ---------------------------------------------------------------------


def _definition(args: argparse.Namespace) -> dict[str, Any]:
    if args.device and (args.tag or args.profile):
        raise CommandError("a group is static (--device) or dynamic (--tag/--profile), not both")
    body: dict[str, Any] = {"description": args.description}
    if args.tag or args.profile:
        body["query"] = {"tags": args.tag or [], "profile": args.profile}
    else:
        body["devices"] = args.device or []
    return body


def cmd_groups_create(args: argparse.Namespace) -> int:
    _print(_call(args, "POST", "/v1/groups", json={"name": args.name, **_definition(args)}), group)
    return 0


def cmd_groups_set(args: argparse.Namespace) -> int:
    _print(_call(args, "PUT", f"/v1/groups/{args.name}", json=_definition(args)), group)
    return 0


def cmd_groups_list(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", "/v1/groups"), groups_list)
    return 0


def cmd_groups_show(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/groups/{args.name}"), group)
    return 0


def cmd_groups_add(args: argparse.Namespace) -> int:
    _print(_call(args, "POST", f"/v1/groups/{args.name}/devices", json={"devices": args.devices}), group)
    return 0


def cmd_groups_remove(args: argparse.Namespace) -> int:
    _print(_call(args, "DELETE", f"/v1/groups/{args.name}/devices/{args.device}"), group)
    return 0


def cmd_groups_delete(args: argparse.Namespace) -> int:
    _print(_call(args, "DELETE", f"/v1/groups/{args.name}"), group)
    return 0


def cmd_windows_add(args: argparse.Namespace) -> int:
    body = {
        "group": args.group,
        "device_id": args.device,
        "cron": args.cron,
        "duration_s": parse_duration(args.duration),
        "timezone": args.timezone,
    }
    _print(_call(args, "POST", "/v1/maintenance-windows", json=body), lambda w: windows_list([w]))
    return 0


def cmd_windows_list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("group", args.group), ("device_id", args.device)) if v}
    _print(_call(args, "GET", "/v1/maintenance-windows", params=params), windows_list)
    return 0


def cmd_windows_remove(args: argparse.Namespace) -> int:
    _print(_call(args, "DELETE", f"/v1/maintenance-windows/{args.id}"), lambda w: windows_list([w]))
    return 0


def cmd_windows_status(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/v1/devices/{args.device}/maintenance"), device_maintenance)
    return 0


def _definition_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", action="extend", nargs="+", metavar="ID", help="static: these devices")
    parser.add_argument(
        "--tag",
        action="extend",
        nargs="+",
        metavar="T",
        help="dynamic: devices carrying every one of these tags",
    )
    parser.add_argument("--profile", default=None, help="dynamic: devices of this profile")
    parser.add_argument("--description", default="", help="what the group is for")


def add_commands(commands: Any, remote: argparse.ArgumentParser) -> None:
    groups = commands.add_parser(
        "groups",
        help="device groups: static (listed devices) or dynamic (tags and profile); rollout targets",
    ).add_subparsers(dest="action", required=True)
    create = groups.add_parser("create", parents=[remote], help="make a group (changes need operator)")
    create.add_argument("name", help="1-64 letters, digits, '_', '.', '-'")
    _definition_flags(create)
    create.set_defaults(func=cmd_groups_create)
    replace = groups.add_parser("set", parents=[remote], help="give a group a new definition; windows stay")
    replace.add_argument("name", help="an existing group")
    _definition_flags(replace)
    replace.set_defaults(func=cmd_groups_set)
    groups.add_parser("list", parents=[remote], help="every group, its kind, size and windows").set_defaults(
        func=cmd_groups_list
    )
    show = groups.add_parser("show", parents=[remote], help="a group's devices now and its windows")
    show.add_argument("name", help="group name")
    show.set_defaults(func=cmd_groups_show)
    add = groups.add_parser("add", parents=[remote], help="add devices to a static group")
    add.add_argument("name", help="a static group")
    add.add_argument("devices", nargs="+", metavar="DEVICE", help="registered device ids")
    add.set_defaults(func=cmd_groups_add)
    remove = groups.add_parser("remove", parents=[remote], help="take a device out of a static group")
    remove.add_argument("name", help="a static group")
    remove.add_argument("device", help="a device in it")
    remove.set_defaults(func=cmd_groups_remove)
    delete = groups.add_parser(
        "delete", parents=[remote], help="remove a group and its windows (rollouts keep their devices)"
    )
    delete.add_argument("name", help="group name")
    delete.set_defaults(func=cmd_groups_delete)

    windows = commands.add_parser(
        "windows", help="maintenance windows: when rollouts may update a group's or a device's devices"
    ).add_subparsers(dest="action", required=True)
    add_window = windows.add_parser(
        "add",
        parents=[remote],
        help="a window opening at each cron match for a duration; a device outside its windows waits",
    )
    target = add_window.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", default=None, help="the group it applies to")
    target.add_argument(
        "--device", default=None, help="the device it applies to (its own replace its groups')"
    )
    add_window.add_argument(
        "--cron", required=True, help="five fields, e.g. '0 2 * * *' (02:00 daily) or '0 22 * * mon-fri'"
    )
    add_window.add_argument("--duration", required=True, help="how long it stays open: 3600, 90m, 2h, 1d")
    add_window.add_argument(
        "--timezone",
        default="UTC",
        help="IANA time zone the cron is read in, e.g. Europe/Paris (default UTC)",
    )
    add_window.set_defaults(func=cmd_windows_add)
    listing = windows.add_parser("list", parents=[remote], help="windows, open or when they open next")
    listing.add_argument("--group", default=None, help="only this group's")
    listing.add_argument("--device", default=None, help="only this device's own")
    listing.set_defaults(func=cmd_windows_list)
    drop = windows.add_parser("remove", parents=[remote], help="delete a window")
    drop.add_argument("id", help="window id (windows list)")
    drop.set_defaults(func=cmd_windows_remove)
    status = windows.add_parser(
        "status",
        parents=[remote],
        help="whether a rollout may update a device now, and the windows deciding it",
    )
    status.add_argument("device", help="device id")
    status.set_defaults(func=cmd_windows_status)
