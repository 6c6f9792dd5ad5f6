"""Device groups: named sets of devices that rollouts target and maintenance windows apply to.

A *static* group lists its devices; every one must be registered when it is added. A
*dynamic* group is a saved query (devices carrying every one of ``tags``, of ``profile``)
that is resolved each time it is read, so a device registered later with matching tags
is a member at once. A group is one or the other for its whole life; replacing its
definition may switch it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from controller.errors import DuplicateKeyError, GroupExists, GroupNotFound, InvalidGroup, InvalidInputError
from controller.fleet import validate_tags
from controller.store import Store

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_DESCRIPTION = 500
MAX_STATIC_DEVICES = 100_000

GroupKind = Literal["static", "dynamic"]


@dataclass(frozen=True)
class Query:
    """Devices carrying every one of ``tags`` and, if given, of profile ``profile``."""

    tags: tuple[str, ...] = ()
    profile: str | None = None

    def matches(self, tags: Iterable[str], profile: str | None) -> bool:
        return set(self.tags) <= set(tags) and (self.profile is None or self.profile == profile)

    def describe(self) -> str:
        parts = [f"tags {', '.join(self.tags)}"] if self.tags else []
        if self.profile:
            parts.append(f"profile {self.profile}")
        return " and ".join(parts)


@dataclass(frozen=True)
class Group:
    name: str
    kind: GroupKind
    # Static: the devices listed. Dynamic: the devices the query matches now.
    devices: tuple[str, ...]
    query: Query | None
    description: str
    created_at: float
    updated_at: float


class Groups:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    # -- changes ----------------------------------------------------------------

    def create(
        self,
        name: str,
        devices: Sequence[str] | None = None,
        query: Query | None = None,
        description: str = "",
    ) -> Group:
        _check_name(name)
        kind, devices, query = self._definition(devices, query, description)
        now = self.clock()
        try:
            with self.store.transaction() as tx:
                tx.execute(
                    "INSERT INTO device_groups (name, kind, query, description, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (name, kind, _query_json(query), description, now, now),
                )
                self._put_members(tx, name, devices)
        except DuplicateKeyError:
            raise GroupExists(
                f"group {name} exists already (replace it with PUT, or pick another name)"
            ) from None
        return self.get(name)

    def replace(
        self,
        name: str,
        devices: Sequence[str] | None = None,
        query: Query | None = None,
        description: str = "",
    ) -> Group:
        """A new definition for an existing group; its windows stay."""
        self.get(name)
        kind, devices, query = self._definition(devices, query, description)
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE device_groups SET kind = ?, query = ?, description = ?, updated_at = ? WHERE name = ?",
                (kind, _query_json(query), description, self.clock(), name),
            )
            tx.execute("DELETE FROM group_members WHERE group_name = ?", (name,))
            self._put_members(tx, name, devices)
        return self.get(name)

    def add_devices(self, name: str, device_ids: Sequence[str]) -> Group:
        group = self.get(name)
        if group.kind != "static":
            raise InvalidGroup(
                f"group {name} is dynamic ({group.query.describe() if group.query else 'a query'}): "
                "its members follow its query; change the query instead"
            )
        wanted = self._known(device_ids)
        with self.store.transaction() as tx:
            self._put_members(tx, name, [d for d in wanted if d not in group.devices])
            tx.execute("UPDATE device_groups SET updated_at = ? WHERE name = ?", (self.clock(), name))
        return self.get(name)

    def remove_device(self, name: str, device_id: str) -> Group:
        group = self.get(name)
        if group.kind != "static":
            raise InvalidGroup(f"group {name} is dynamic: its members follow its query")
        if device_id not in group.devices:
            raise GroupNotFound(f"device {device_id} is not in group {name}")
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM group_members WHERE group_name = ? AND device_id = ?", (name, device_id))
            tx.execute("UPDATE device_groups SET updated_at = ? WHERE name = ?", (self.clock(), name))
        return self.get(name)

    def delete(self, name: str) -> Group:
        """Removes the group and its maintenance windows; rollouts that targeted it keep their devices."""
        group = self.get(name)
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM maintenance_windows WHERE group_name = ?", (name,))
            tx.execute("DELETE FROM group_members WHERE group_name = ?", (name,))
            tx.execute("DELETE FROM device_groups WHERE name = ?", (name,))
        return group

    # -- reading ----------------------------------------------------------------

    def get(self, name: str) -> Group:
        row = self.store.query_one("SELECT * FROM device_groups WHERE name = ?", (name,))
        if row is None:
            raise GroupNotFound(f"unknown group {name}")
        return self._group(row, self._devices())

    def exists(self, name: str) -> bool:
        return self.store.query_one("SELECT name FROM device_groups WHERE name = ?", (name,)) is not None

    def all(self) -> list[Group]:
        rows = self.store.query("SELECT * FROM device_groups ORDER BY name")
        devices = self._devices() if rows else []
        return [self._group(r, devices) for r in rows]

    def members(self, name: str) -> list[str]:
        return list(self.get(name).devices)

    def memberships(self, names: Iterable[str]) -> dict[str, list[str]]:
        """For each device in any of the groups ``names``: which of them it is in."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        rows = self.store.query(
            f"SELECT * FROM device_groups WHERE name IN ({','.join('?' * len(wanted))}) ORDER BY name", wanted
        )
        # Every device's tags are read only when a dynamic group needs them.
        devices = self._devices() if any(r["kind"] == "dynamic" for r in rows) else []
        out: dict[str, list[str]] = {}
        for row in rows:
            group = self._group(row, devices)
            for device_id in group.devices:
                out.setdefault(device_id, []).append(group.name)
        return out

    # -- inside -----------------------------------------------------------------

    def _definition(
        self, devices: Sequence[str] | None, query: Query | None, description: str
    ) -> tuple[GroupKind, list[str], Query | None]:
        if len(description) > MAX_DESCRIPTION:
            raise InvalidGroup(f"description: at most {MAX_DESCRIPTION} characters")
        if devices is not None and query is not None:
            raise InvalidGroup("a group is static (devices) or dynamic (query), not both")
        if query is None:
            return "static", self._known(devices or ()), None
        if not query.tags and not query.profile:
            raise InvalidGroup("a dynamic group's query needs tags, a profile, or both")
        try:
            tags = tuple(validate_tags(query.tags))
        except InvalidInputError as exc:
            raise InvalidGroup(f"query.tags: {exc}") from None
        if query.profile is not None and not self.store.query_one(
            "SELECT id FROM profiles WHERE id = ?", (query.profile,)
        ):
            raise InvalidGroup(
                f"query.profile: unknown profile {query.profile} (see `edgefleet profiles list`)"
            )
        return "dynamic", [], Query(tags, query.profile)

    def _known(self, device_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(device_ids))
        if len(ids) > MAX_STATIC_DEVICES:
            raise InvalidGroup(f"at most {MAX_STATIC_DEVICES} devices in a static group, got {len(ids)}")
        known = {r["device_id"] for r in self.store.query("SELECT device_id FROM devices")} if ids else set()
        missing = [d for d in ids if d not in known]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise InvalidGroup(f"unknown devices: {shown}")
        return ids

    @staticmethod
    def _put_members(tx: Store, name: str, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            tx.execute("INSERT INTO group_members (group_name, device_id) VALUES (?, ?)", (name, device_id))

    def _devices(self) -> list[tuple[str, list[str], str | None]]:
        """Every device as (id, tags, profile), for resolving dynamic groups."""
        rows = self.store.query(
            "SELECT d.device_id, d.tags, p.profile_id FROM devices d"
            " LEFT JOIN device_profiles p ON p.device_id = d.device_id ORDER BY d.device_id"
        )
        return [(r["device_id"], json.loads(r["tags"]), r["profile_id"]) for r in rows]

    def _group(self, row: dict[str, Any], devices: list[tuple[str, list[str], str | None]]) -> Group:
        query = _query_from(row["query"])
        if row["kind"] == "dynamic" and query is not None:
            members = tuple(d for d, tags, profile in devices if query.matches(tags, profile))
            kind: GroupKind = "dynamic"
        else:
            rows = self.store.query(
                "SELECT device_id FROM group_members WHERE group_name = ? ORDER BY device_id", (row["name"],)
            )
            members = tuple(r["device_id"] for r in rows)
            kind = "static"
        return Group(
            name=row["name"],
            kind=kind,
            devices=members,
            query=query,
            description=row["description"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidGroup(f"invalid group name {name!r}: use 1-64 letters, digits, '_', '.', '-'")


def _query_json(query: Query | None) -> str:
    return json.dumps({"tags": list(query.tags), "profile": query.profile} if query else None)


def _query_from(raw: str) -> Query | None:
    doc = json.loads(raw)
    return Query(tuple(doc["tags"]), doc["profile"]) if doc else None
