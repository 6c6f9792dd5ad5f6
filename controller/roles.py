"""Controller roles: what one ``edgefleet controller serve`` process does.

- ``api``: the REST API and the console (and the optimizer, which works on what is uploaded);
- ``ingest``: what devices send (telemetry, events, reported state, status, captured data,
  desired-state requests);
- ``chunks``: artifact chunk requests, and the wave broadcasts of the desired states it publishes;
- ``engine``: the singletons, each run only where this process holds its lease
  (controller.leases): the rollout runner; the maintenance loop (drift baselines, capture
  and retraining policies, retention and partitions, the revocation list).

By default a process has every role: today's single controller, with the plain MQTT
subscriptions it always had. A process with only some of them shares the database with
others (PostgreSQL) and, on MQTT 5, subscribes with shared subscriptions (``$share/GROUP/...``)
so that the broker gives each message to one process of the group: any number of ingest and
chunks processes can run at once. MQTT 3.1.1 (NATS's MQTT) has no shared subscriptions: there
every process with a role subscribes plainly, so run one ingest and one chunks process per
broker (docs/scaling.md).

Each process connected to the broker at once needs an account of its own, because the broker
binds the client id to the username (and so one persistent session to each):
``edgefleet-controller`` without ``--instance``, ``edgefleet-controller-N`` with ``--instance N``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

from edgefleet_proto.topics import Kind, fleet_subscription

from controller.errors import ConfigError
from controller.settings import CONTROLLER_USER


class Role(StrEnum):
    API = "api"
    INGEST = "ingest"
    CHUNKS = "chunks"
    ENGINE = "engine"


ALL = frozenset(Role)

# What each role receives from devices.
INBOUND: dict[Role, tuple[Kind, ...]] = {
    Role.INGEST: (
        Kind.REPORTED,
        Kind.STATUS,
        Kind.TELEMETRY,
        Kind.EVENTS,
        Kind.CAPTURE,
        Kind.DESIRED_REQUEST,
    ),
    Role.CHUNKS: (Kind.ARTIFACT_REQUEST,),
}
# The shared-subscription group of each role's processes.
SHARE_GROUPS: dict[Role, str] = {Role.INGEST: "edgefleet-ingest", Role.CHUNKS: "edgefleet-chunks"}

# Controller processes that may be connected at once besides the one without --instance: the
# broker's ACL (deploy/mosquitto/edgefleet.acl) and password file name each of their accounts.
MAX_INSTANCES = 16
_INSTANCE_ACCOUNT = re.compile(rf"^{re.escape(CONTROLLER_USER)}-([1-9][0-9]*)$")


def parse_roles(text: str) -> frozenset[Role]:
    """``api,ingest,...`` or ``all``; an unknown or missing role is a ConfigError naming the choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return ALL
    known = ", ".join(r.value for r in Role)
    if not names:
        raise ConfigError(f"--roles needs at least one of {known} (or all)")
    unknown = [n for n in names if n not in {r.value for r in Role}]
    if unknown:
        raise ConfigError(f"unknown role {unknown[0]!r}: choose among {known} (or all)")
    return frozenset(Role(n) for n in names)


def describe(roles: Iterable[Role]) -> str:
    """The roles in their canonical order, comma-separated."""
    chosen = set(roles)
    return ",".join(r.value for r in Role if r in chosen)


def account(instance: int) -> str:
    """The MQTT account (username and client id) of the controller process ``--instance N``."""
    if not 1 <= instance <= MAX_INSTANCES:
        raise ConfigError(f"--instance must be between 1 and {MAX_INSTANCES}, not {instance}")
    return f"{CONTROLLER_USER}-{instance}"


def instance_accounts() -> list[str]:
    """Every account ``--instance`` can name, in order."""
    return [account(n) for n in range(1, MAX_INSTANCES + 1)]


def is_controller_account(username: str) -> bool:
    """Whether ``username`` is one of the controller's own accounts (never a device's)."""
    match = _INSTANCE_ACCOUNT.match(username)
    return username == CONTROLLER_USER or (match is not None and int(match.group(1)) <= MAX_INSTANCES)


def subscriptions(roles: frozenset[Role], shared: bool) -> list[tuple[str, Kind]]:
    """The topic filter of each kind these roles receive: a shared subscription of the role's
    group when ``shared`` (a process among others, on MQTT 5), else the plain fleet filter."""
    out: list[tuple[str, Kind]] = []
    for role in Role:
        if role not in roles:
            continue
        for kind in INBOUND.get(role, ()):
            plain = fleet_subscription(kind)
            out.append((f"$share/{SHARE_GROUPS[role]}/{plain}" if shared else plain, kind))
    return out


def every_filter() -> list[str]:
    """Every filter a controller process may have subscribed to, plain or shared: what a session
    kept from the roles a process had before and no longer has is unsubscribed at connection."""
    shared = subscriptions(ALL, shared=True)
    return [topic for topic, _ in subscriptions(ALL, shared=False)] + [topic for topic, _ in shared]
