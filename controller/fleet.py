"""Devices: registration and MQTT credentials, tags, and what each device last said.

A device's password is generated here, returned once, and only its mosquitto
hash is stored. Every change of the device list rewrites the broker's password
file. Reported state and online status arrive from the transport; the last
message received is the device's current state.

The transport asks, for every message, whether the device is registered and
notes when it was seen. A device downloading a model sends dozens of chunk
requests a second, so registered ids are remembered and the last_seen of chunk
requests is written at most once a second per device (shown at once all the same).

A device may fetch only the artifacts it was ever assigned (:meth:`Fleet.may_fetch`):
those in its desired state and those any rollout set or restored for it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as
from edgefleet_proto.tenancy import tenant_or_default
from edgefleet_proto.topics import TopicError, validate_device_id
from google.protobuf.message import Message

from controller.errors import (
    BrokerAuthError,
    DeviceExists,
    DeviceNotFound,
    DuplicateKeyError,
    InvalidDeviceId,
    InvalidInputError,
)
from controller.log_bounds import bounded_line
from controller.mosquitto_auth import BrokerAuth, generate_password, hash_password
from controller.roles import instance_accounts, is_controller_account
from controller.settings import Settings
from controller.store import Store

log = logging.getLogger(__name__)

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}$")
MAX_TAGS = 32
# A device fetching a model sends a chunk request every few milliseconds; its
# last_seen is written at most this often, the times in between wait in memory.
SEEN_WRITE_INTERVAL_S = 1.0


def phase_name(phase: int) -> str:
    """``MODEL_PHASE_ACTIVE`` -> ``active``: the API's spelling of a phase."""
    return fleet_pb2.ModelPhase.Name(phase).removeprefix("MODEL_PHASE_").lower()  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelState:
    tenant: str
    model_name: str
    model_version: str
    artifact_digest: str
    phase: str
    bytes_have: int
    bytes_total: int
    error: str
    rollout_id: str = ""


@dataclass(frozen=True)
class Condition:
    """What keeps a device from its work, as it reported it (e.g. a full disk)."""

    kind: str
    message: str
    since_ms: int
    count: int


# A device's report is bounded by the broker's packet size; these bound what one is kept as.
MAX_CONDITIONS = 16
MAX_CONDITION_TEXT = 512


@dataclass(frozen=True)
class Reported:
    desired_generation: int
    applied_generation: int
    models: list[ModelState] = field(default_factory=list)
    agent_version: str = ""
    reported_at_ms: int = 0
    conditions: list[Condition] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: fleet_pb2.ReportedState) -> Reported:
        return cls(
            desired_generation=msg.desired_generation,
            applied_generation=msg.applied_generation,
            agent_version=msg.agent_version,
            reported_at_ms=msg.reported_at_ms,
            conditions=[
                Condition(c.kind[:64], c.message[:MAX_CONDITION_TEXT], c.since_ms, c.count)
                for c in msg.conditions[:MAX_CONDITIONS]
            ],
            models=[
                ModelState(
                    tenant=tenant_or_default(m.tenant),
                    model_name=m.model_name,
                    model_version=m.model_version,
                    artifact_digest=m.artifact_digest,
                    phase=phase_name(m.phase),
                    bytes_have=m.bytes_have,
                    bytes_total=m.bytes_total,
                    error=m.error,
                    rollout_id=m.rollout_id,
                )
                for m in msg.models
            ],
        )

    @classmethod
    def from_json(cls, raw: str) -> Reported:
        data = json.loads(raw)
        data["models"] = [ModelState(**m) for m in data["models"]]
        # Reports stored before devices sent conditions have none.
        data["conditions"] = [Condition(**c) for c in data.get("conditions", [])]
        return cls(**data)


@dataclass(frozen=True)
class Device:
    device_id: str
    tags: list[str]
    created_at: float
    online: bool
    last_seen: float | None
    agent_version: str
    reported: Reported | None
    reported_received_at: float | None
    desired_generation: int
    # The device class (firmware_profiles/) variant choice is made for; "" before one is set.
    profile: str = ""


@dataclass(frozen=True)
class Credentials:
    device_id: str
    mqtt_username: str
    mqtt_password: str
    broker_host: str
    broker_port: int
    mqtt_protocol: str
    # Hex of the controller's Ed25519 public key, for the agent's [security] controller_public_key.
    controller_public_key: str = ""
    profile: str = ""


@dataclass(frozen=True)
class Registration:
    """One device to register: its id, tags and device profile ("" none)."""

    device_id: str
    tags: tuple[str, ...] = ()
    profile: str = ""


def validate_tags(tags: Sequence[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        raise InvalidInputError(f"at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not _TAG.fullmatch(tag):
            raise InvalidInputError(
                f"invalid tag {tag!r}: use 1-64 letters, digits, '_', '.', ':', '=', '/', '-'"
            )
    return sorted(set(tags))


def _device_from_row(row: dict[str, Any]) -> Device:
    return Device(
        device_id=row["device_id"],
        tags=json.loads(row["tags"]),
        created_at=row["created_at"],
        online=bool(row["online"]),
        last_seen=row["last_seen"],
        agent_version=row["agent_version"],
        reported=Reported.from_json(row["reported"]) if row["reported"] else None,
        reported_received_at=row["reported_received_at"],
        desired_generation=row["desired_generation"],
        profile=row.get("profile") or "",
    )


# Never back in time (messages of one device are handled by several workers).
# A report or status older by the device's (session, seq) than the stored one was overtaken in
# another ingest process and is not stored, unless the stored one was received this long before:
# then the device's numbering started over (its clock went back across a restart, its count was
# hostile) and the newest received wins again rather than leave the device unheard.
REORDER_S = 60.0
# What a BIGINT holds; the device's uint64 counts are clamped to it.
_MAX_ORDER = 2**63 - 1


@dataclass(frozen=True)
class ReportRecorded:
    kept: bool
    # The desired state issued again under a newer generation, to be published (Fleet._catch_up).
    reissued: bytes | None


def _said_order(session: int, seq: int) -> tuple[int, int]:
    return min(session, _MAX_ORDER), min(seq, _MAX_ORDER)


def _newer_than_stored(kind: str) -> str:
    """The condition on the ``devices`` row that a message numbered (session, seq) is newer than the
    stored ``kind`` (reported or status); its arguments come from :func:`_said_order_args`."""
    return (
        f"(? = 0 OR {kind}_session < ? OR ({kind}_session = ? AND {kind}_seq < ?)"
        f" OR {kind}_received_at IS NULL OR {kind}_received_at < ?)"
    )


def _said_order_args(session: int, seq: int, received_at: float) -> tuple[int, int, int, int, float]:
    session, seq = _said_order(session, seq)
    return session, session, session, seq, received_at - REORDER_S


# Devices whose last_seen one statement writes (two parameters each).
TOUCH_BATCH = 500
_TOUCH = "UPDATE devices SET last_seen = ? WHERE device_id = ? AND (last_seen IS NULL OR last_seen < ?)"
_DEVICES = "SELECT d.*, p.profile_id AS profile FROM devices d LEFT JOIN device_profiles p ON p.device_id = d.device_id"


class Fleet:
    def __init__(
        self, store: Store, settings: Settings, broker_auth: BrokerAuth, controller_public_key: str = ""
    ) -> None:
        self.store = store
        self.settings = settings
        self.broker_auth = broker_auth
        self.controller_public_key = controller_public_key
        # Devices are never deleted except when a registration is undone, so an id
        # found once stays known; an unknown id is looked up every time (it may be
        # registered a moment later).
        self._known_lock = threading.Lock()
        self._known: set[str] = set()
        # note_seen(): last write per device and the newer times not yet written.
        self._seen_lock = threading.Lock()
        self._seen_written: dict[str, float] = {}
        self._seen_pending: dict[str, float] = {}
        # may_fetch(): digests each device was ever assigned. Assignments are never
        # taken back from history, so a digest found once stays granted.
        self._grants_lock = threading.Lock()
        self._grants: dict[str, frozenset[str]] = {}

    def register(self, device_id: str, tags: Sequence[str] = (), profile: str = "") -> Credentials:
        return self.register_many([Registration(device_id, tuple(tags), profile)])[0]

    def register_many(self, registrations: Sequence[Registration]) -> list[Credentials]:
        """Register devices all at once or none: one transaction and one rewrite of the broker's
        password file (with one reload) for the lot, where registering each in turn rewrites the
        whole file and reloads the broker once per device."""
        if not registrations:
            return []
        for r in registrations:
            self._check_registration(r)
        ids = [r.device_id for r in registrations]
        twice = sorted(d for d, n in Counter(ids).items() if n > 1)
        if twice:
            raise InvalidInputError(f"device ids listed more than once: {', '.join(twice[:10])}")
        passwords = [generate_password() for _ in registrations]
        now = time.time()
        try:
            with self.store.transaction() as tx:
                for r, password in zip(registrations, passwords, strict=True):
                    tx.execute(
                        "INSERT INTO devices (device_id, tags, password_hash, created_at) VALUES (?, ?, ?, ?)",
                        (r.device_id, json.dumps(validate_tags(r.tags)), hash_password(password), now),
                    )
                    if r.profile:
                        tx.execute(
                            "INSERT INTO device_profiles (device_id, profile_id) VALUES (?, ?)",
                            (r.device_id, r.profile),
                        )
        except DuplicateKeyError:
            if len(ids) == 1:
                raise DeviceExists(f"device {ids[0]} is already registered") from None
            known = sorted(self.known(ids))
            more = f" and {len(known) - 10} more" if len(known) > 10 else ""
            named = ", ".join(known[:10]) + more or "a revoked device among them"
            raise DeviceExists(
                f"devices already registered: {named}; none of the batch was registered"
            ) from None
        try:
            self.sync_broker()
        except BrokerAuthError:
            # Without broker credentials the devices could never connect: undo.
            with self.store.transaction() as tx:
                for device_id in ids:
                    tx.execute("DELETE FROM device_profiles WHERE device_id = ?", (device_id,))
                    tx.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            for device_id in ids:
                self._forget(device_id)
            log.error(
                "device registration undone devices=%s count=%d reason=broker credentials not applied",
                ",".join(ids[:10]),
                len(ids),
            )
            raise
        for r in registrations:
            log.info(
                "device registered device=%s tags=%s profile=%s",
                r.device_id,
                ",".join(validate_tags(r.tags)),
                r.profile or "-",
            )
        return [
            Credentials(
                device_id=r.device_id,
                mqtt_username=r.device_id,
                mqtt_password=password,
                broker_host=self.settings.broker_host,
                broker_port=self.settings.broker_port,
                mqtt_protocol=self.settings.mqtt_protocol,
                controller_public_key=self.controller_public_key,
                profile=r.profile,
            )
            for r, password in zip(registrations, passwords, strict=True)
        ]

    def _check_registration(self, r: Registration) -> None:
        try:
            validate_device_id(r.device_id)
        except TopicError as exc:
            raise InvalidDeviceId(str(exc)) from None
        if r.device_id == self.settings.mqtt_username or is_controller_account(r.device_id):
            raise InvalidDeviceId(f"device id {r.device_id!r} is reserved for the controller's MQTT accounts")
        validate_tags(r.tags)
        if r.profile and self.store.query_one("SELECT 1 FROM profiles WHERE id = ?", (r.profile,)) is None:
            raise InvalidInputError(
                f"unknown profile {r.profile!r}: register it first (edgefleet profiles register)"
            )

    def password_entries(self) -> list[tuple[str, str]]:
        """The controller's accounts' (one per process, controller.roles, all with its password) and
        every device's broker password, but a revoked device's (controller.revocation)."""
        rows = self.store.query(
            "SELECT device_id, password_hash FROM devices"
            " WHERE device_id NOT IN (SELECT device_id FROM device_revocations) ORDER BY device_id"
        )
        accounts = [self.settings.mqtt_username, *instance_accounts()]
        controller = [(name, self.settings.mqtt_password_hash) for name in accounts]
        # A device registered under one of those names before they were reserved gets no entry:
        # it would take a controller process's session.
        return controller + [
            (r["device_id"], r["password_hash"]) for r in rows if r["device_id"] not in accounts
        ]

    def password_hash(self, device_id: str) -> str | None:
        """One registered device's password hash (None when unknown), for a broker that asks
        the controller at each login (controller.api.broker_auth); a revoked device has none."""
        rows = self.store.query(
            "SELECT password_hash FROM devices WHERE device_id = ?"
            " AND device_id NOT IN (SELECT device_id FROM device_revocations)",
            [device_id],
        )
        return str(rows[0]["password_hash"]) if rows else None

    def sync_broker(self) -> None:
        self.broker_auth.sync(self.password_entries())

    def get(self, device_id: str) -> Device:
        row = self.store.query_one(f"{_DEVICES} WHERE d.device_id = ?", (device_id,))
        if row is None:
            raise DeviceNotFound(f"unknown device {device_id}")
        return self._with_pending_seen(_device_from_row(row))

    def all(self) -> list[Device]:
        return [
            self._with_pending_seen(_device_from_row(r))
            for r in self.store.query(f"{_DEVICES} ORDER BY d.device_id")
        ]

    def known(self, device_ids: Sequence[str]) -> set[str]:
        if not device_ids:
            return set()
        marks = ",".join("?" * len(device_ids))
        # A revoked device is known no more: what it still sends is ignored (controller.revocation).
        rows = self.store.query(
            f"SELECT device_id FROM devices WHERE device_id IN ({marks})"
            " AND device_id NOT IN (SELECT device_id FROM device_revocations)",
            list(device_ids),
        )
        return {r["device_id"] for r in rows}

    def is_known(self, device_id: str) -> bool:
        """Whether ``device_id`` is registered; asked for every message, so a hit is cached."""
        with self._known_lock:
            if device_id in self._known:
                return True
        if not self.known([device_id]):
            return False
        with self._known_lock:
            self._known.add(device_id)
        return True

    def forget(self, device_id: str) -> None:
        """Drop what is cached about a device (it was revoked: it is not known any more)."""
        self._forget(device_id)

    def _forget(self, device_id: str) -> None:
        with self._known_lock:
            self._known.discard(device_id)
        with self._seen_lock:
            self._seen_written.pop(device_id, None)
            self._seen_pending.pop(device_id, None)
        with self._grants_lock:
            self._grants.pop(device_id, None)

    def may_fetch(self, device_id: str, digest: str) -> bool:
        """Whether ``digest`` is, or once was, assigned to ``device_id`` (asked for every
        chunk request, so a grant found is cached; a miss reads the database again)."""
        with self._grants_lock:
            if digest in self._grants.get(device_id, ()):
                return True
        granted = self.assigned_digests(device_id)
        with self._grants_lock:
            self._grants[device_id] = granted
        return digest in granted

    def assigned_digests(self, device_id: str) -> frozenset[str]:
        """Every artifact digest in the device's desired state and in any rollout's
        assignment for it (the one a rollout sets, and the one it restores on rollback)."""
        digests: set[str] = set()
        row = self.store.query_one("SELECT desired FROM devices WHERE device_id = ?", (device_id,))
        if row is not None and row["desired"] is not None:
            try:
                digests |= _digests_in(decode_as(fleet_pb2.DesiredState, bytes(row["desired"])))
            except PayloadError:
                log.warning(
                    "stored desired state unreadable, rollout assignments still apply device=%s", device_id
                )
        for r in self.store.query(
            "SELECT wanted, previous FROM rollout_members WHERE device_id = ?", (device_id,)
        ):
            for blob in (r["wanted"], r["previous"]):
                if blob:
                    try:
                        digests |= _digests_in(decode_as(fleet_pb2.ModelAssignment, bytes(blob)))
                    except PayloadError:
                        continue
        for r in self.store.query("SELECT digest FROM rollout_targets WHERE device_id = ?", (device_id,)):
            digests.add(r["digest"])
        for r in self.store.query(
            "SELECT r.digest FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id WHERE d.device_id = ?",
            (device_id,),
        ):
            digests.add(r["digest"])
        digests.discard("")
        return frozenset(digests)

    def touch(self, device_id: str, seen_at: float) -> None:
        self.store.execute(_TOUCH, (seen_at, device_id, seen_at))

    def touch_many(self, seen_at: Mapping[str, float]) -> None:
        """:meth:`touch` for many devices, one statement per :data:`TOUCH_BATCH` of them (one
        per device was a third of a telemetry batch's cost)."""
        devices = sorted(seen_at)
        for start in range(0, len(devices), TOUCH_BATCH):
            chunk = devices[start : start + TOUCH_BATCH]
            marks = ", ".join("?" for _ in chunk)
            if self.store.is_postgresql:
                # The rows locked in device order first, as flush_seen and ingest batches take
                # them: an UPDATE ... FROM locks in whatever order its join runs, and two
                # transactions taking overlapping rows in different orders can deadlock.
                self.store.query(
                    f"SELECT device_id FROM devices WHERE device_id IN ({marks}) ORDER BY device_id FOR UPDATE",
                    chunk,
                )
            self.store.execute(
                "WITH seen(device_id, seen_at) AS (VALUES "
                + ", ".join("(?, ?)" for _ in chunk)
                + ") UPDATE devices SET last_seen = seen.seen_at FROM seen"
                " WHERE devices.device_id = seen.device_id"
                " AND (devices.last_seen IS NULL OR devices.last_seen < seen.seen_at)",
                [v for device_id in chunk for v in (device_id, seen_at[device_id])],
            )

    def note_seen(self, device_id: str, seen_at: float) -> None:
        """:meth:`touch` for frequent messages: at most one write per device every
        :data:`SEEN_WRITE_INTERVAL_S` of ``seen_at``. A time not written yet is kept in
        memory, shown by :meth:`get` and :meth:`all`, and written by the next write
        for that device or by :meth:`flush_seen`."""
        with self._seen_lock:
            written = self._seen_written.get(device_id)
            pending = self._seen_pending.get(device_id, 0.0)
            if written is not None and seen_at < written + SEEN_WRITE_INTERVAL_S:
                self._seen_pending[device_id] = max(pending, seen_at)
                return
            seen_at = max(seen_at, pending)
            self._seen_written[device_id] = seen_at
            self._seen_pending.pop(device_id, None)
        self.touch(device_id, seen_at)

    def flush_seen(self) -> int:
        """Write every last_seen :meth:`note_seen` held back, in one transaction; returns how many."""
        with self._seen_lock:
            pending, self._seen_pending = self._seen_pending, {}
            self._seen_written.update(pending)
        if not pending:
            return 0
        try:
            with self.store.transaction() as tx:
                # In device order, as ingest batches take the devices' rows (no lock cycle between them).
                for device_id, seen_at in sorted(pending.items()):
                    tx.execute(_TOUCH, (seen_at, device_id, seen_at))
        except Exception:
            # Not written: keep them for the next flush rather than lose them.
            with self._seen_lock:
                for device_id, seen_at in pending.items():
                    self._seen_pending[device_id] = max(seen_at, self._seen_pending.get(device_id, 0.0))
            raise
        return len(pending)

    def _with_pending_seen(self, device: Device) -> Device:
        with self._seen_lock:
            pending = self._seen_pending.get(device.device_id)
        if pending is None or (device.last_seen is not None and device.last_seen >= pending):
            return device
        return replace(device, last_seen=pending)

    def record_reported(
        self, device_id: str, msg: fleet_pb2.ReportedState, received_at: float
    ) -> ReportRecorded:
        """Store the reported state as the device's current one unless the device said a newer
        one already (:func:`_newer_than_stored`); when stored, also returns the device's desired
        state issued again under a newer generation if it must be published (:meth:`_catch_up`).

        Timestamps do not order reports: a will carries the time it was set (long before the
        device died), and a device without a real-time clock reports 1970 until NTP.
        """
        reported = Reported.from_proto(msg)
        kept = self.store.execute(
            "UPDATE devices SET reported = ?, reported_at_ms = ?, reported_received_at = ?,"
            " reported_session = ?, reported_seq = ? WHERE device_id = ? AND "
            + _newer_than_stored("reported"),
            (
                json.dumps(asdict(reported)),
                msg.reported_at_ms,
                received_at,
                *_said_order(msg.session, msg.seq),
                device_id,
                *_said_order_args(msg.session, msg.seq, received_at),
            ),
        )
        if not kept:
            return ReportRecorded(False, None)
        # Names and versions are the device's: the line is bounded (controller.log_bounds).
        log.info(
            "%s",
            bounded_line(
                "reported state device=%s desired_generation=%d applied_generation=%d models=%s",
                device_id,
                msg.desired_generation,
                msg.applied_generation,
                ";".join(f"{m.tenant}:{m.model_name}@{m.model_version}={m.phase}" for m in reported.models),
            ),
        )
        return ReportRecorded(True, self._catch_up(device_id, msg.desired_generation))

    def _catch_up(self, device_id: str, seen: int) -> bytes | None:
        """A device that saw a newer generation than this controller remembers issuing (its
        database was restored from a backup, or made anew with the same signing key) ignores
        every state issued at or below it, since an agent never goes back a generation. From
        then on the device's generations continue above what it saw, and its current desired
        state, if there is one, is issued again at once under the next one (returned)."""
        row = self.store.query_one(
            "SELECT desired_generation, desired FROM devices WHERE device_id = ?", (device_id,)
        )
        if row is None or seen <= row["desired_generation"]:
            return None
        payload: bytes | None = None
        generation = seen
        if row["desired"] is not None:
            try:
                desired = decode_as(fleet_pb2.DesiredState, bytes(row["desired"]))
            except PayloadError:
                desired = None
            if desired is not None:
                generation = desired.generation = seen + 1
                payload = desired.SerializeToString()
        changed = self.store.execute(
            "UPDATE devices SET desired_generation = ?, desired = coalesce(?, desired)"
            " WHERE device_id = ? AND desired_generation = ?",
            (generation, payload, device_id, row["desired_generation"]),
        )
        if not changed:
            return None
        log.warning(
            "device has seen a newer desired-state generation than this controller issued (restored from a "
            "backup?); its generations go on from there device=%s seen=%d issued=%d reissued=%s",
            device_id,
            seen,
            row["desired_generation"],
            payload is not None,
        )
        return payload

    def record_status(
        self, device_id: str, msg: fleet_pb2.DeviceStatus, received_at: float | None = None
    ) -> bool:
        """Online or offline, stored unless the device said a newer one already (see
        :meth:`record_reported`); returns whether it was stored."""
        received_at = time.time() if received_at is None else received_at
        kept = self.store.execute(
            "UPDATE devices SET online = ?, status_at_ms = ?, agent_version = ?, status_session = ?,"
            " status_seq = ?, status_received_at = ? WHERE device_id = ? AND " + _newer_than_stored("status"),
            (
                int(msg.online),
                msg.at_ms,
                msg.agent_version,
                *_said_order(msg.session, msg.seq),
                received_at,
                device_id,
                *_said_order_args(msg.session, msg.seq, received_at),
            ),
        )
        if not kept:
            return False
        log.info(
            "%s",
            bounded_line(
                "device status device=%s online=%s agent_version=%s", device_id, msg.online, msg.agent_version
            ),
        )
        return True

    def desired_state(self, device_id: str) -> bytes | None:
        """The device's stored desired state (unsigned), or None when nothing was assigned."""
        rows = list(self.store.query("SELECT desired FROM devices WHERE device_id = ?", [device_id]))
        if not rows or rows[0]["desired"] is None:
            return None
        return bytes(rows[0]["desired"])

    def desired_states(self) -> list[tuple[str, bytes]]:
        """Every device's stored desired state (a revoked device's is published no more)."""
        rows = self.store.query(
            "SELECT device_id, desired FROM devices WHERE desired IS NOT NULL"
            " AND device_id NOT IN (SELECT device_id FROM device_revocations) ORDER BY device_id"
        )
        return [(r["device_id"], bytes(r["desired"])) for r in rows]


def _digests_in(message: Message) -> set[str]:
    """Every ``*_digest`` string field anywhere in ``message`` (an assignment's artifact,
    and any other file an assignment may name by digest)."""
    found: set[str] = set()
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None:
            values = value if descriptor.is_repeated else [value]
            for item in values:
                if isinstance(item, Message):
                    found |= _digests_in(item)
        elif descriptor.name.endswith("digest") and isinstance(value, str):
            found.add(value)
    return found
