"""``edgefleet tokens|audit``: operator accounts and the audit log over REST (admin / operator)."""

from __future__ import annotations

import argparse
from typing import Any

from controller.cli import _call, _print

ROLES = ("viewer", "operator", "admin", "metrics")


def cmd_tokens_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name or args.role, "role": args.role}
    if args.expires_in_days is not None:
        body["expires_in_s"] = args.expires_in_days * 86400.0
    created = _call(args, "POST", "/v1/tokens", json=body)
    _print(created)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", "/v1/tokens"))
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    _print(_call(args, "DELETE", f"/v1/tokens/{args.id}"))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.actor:
        params["actor"] = args.actor
    _print(_call(args, "GET", "/v1/audit", params=params))
    return 0


def add_commands(commands: Any, remote: argparse.ArgumentParser) -> None:
    tokens = commands.add_parser(
        "tokens", help="operator tokens with roles: viewer < operator < admin (admin only)"
    ).add_subparsers(dest="action", required=True)
    create = tokens.add_parser("create", parents=[remote], help="make a token; it is printed once")
    create.add_argument("--name", default=None, help="who or what holds it, e.g. alice (default: the role)")
    create.add_argument(
        "--role",
        choices=ROLES,
        default="viewer",
        help="viewer reads; operator also changes the fleet; admin also manages tokens, keys and devices",
    )
    create.add_argument(
        "--expires-in-days",
        type=float,
        default=None,
        metavar="DAYS",
        help="lifetime (default: until revoked)",
    )
    create.set_defaults(func=cmd_tokens_create)
    tokens.add_parser("list", parents=[remote], help="every token (never the secrets)").set_defaults(
        func=cmd_tokens_list
    )
    revoke = tokens.add_parser(
        "revoke", parents=[remote], help="refuse a token from now on; ends its sessions"
    )
    revoke.add_argument("id", help="token id (from `tokens list`)")
    revoke.set_defaults(func=cmd_tokens_revoke)

    audit = commands.add_parser(
        "audit", parents=[remote], help="who changed what and when, newest first (operator or admin)"
    )
    audit.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    audit.add_argument("--actor", default=None, help="only this token's name")
    audit.set_defaults(func=cmd_audit)
