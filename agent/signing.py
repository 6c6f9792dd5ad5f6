"""The controller key this device trusts, and the checks made with it.

The key is pinned at provisioning (``[security] controller_public_key`` in
agent.toml, hex of the raw Ed25519 key). Every model assignment must carry the
controller's signature over its manifest (model name, version, variant, sha256,
size; byte format in :mod:`edgefleet_proto.signing`); since the artifact's
sha256 is checked against the signed digest before it is installed, a signed
assignment authenticates the file itself. An assignment that is unsigned,
tampered with or signed by another key is refused with the reason; the tenant
keeps its previous model.

The desired state itself is signed whole (generation, device, assignments,
tenants, drift specs, capture policies, rotations; byte format
:func:`edgefleet_proto.signing.desired_bytes`). :meth:`KeyRing.admit` refuses a
state that is unsigned, signed by another key, tampered with, or meant for
another device, before anything of it is used: nothing is persisted, not even a
rotation it carries, so no message from anyone but the controller can move the
device's generation, tenants or models. Older generations are ignored by the
updater, so a replayed signed state changes nothing either.

Key rotation: a desired state may carry a ``KeyRotation`` (the new key signed by
the old one), preceded by the earlier rotations, oldest first. Each is accepted
only when its signature verifies with the key pinned at that moment, so a device
that slept through several rotations walks the chain one link at a time from the
key it trusts. Each new key is then persisted (``controller_key.json``, atomic
write) and replaces the old one. The persisted key is used as long as the
configured key is the one the rotation chain started from, so re-provisioning
the device with another key in agent.toml takes precedence.

Without a configured key the agent runs unverified (development set-ups) and
says so at start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from edgefleet_proto import fleet_pb2
from edgefleet_proto.signing import (
    PUBLIC_KEY_BYTES,
    SigningFormatError,
    desired_bytes,
    key_id,
    manifest_bytes,
    rotation_bytes,
)
from edgefleet_proto.tenancy import tenant_or_default

from agent.atomic import write_atomic
from agent.errors import ConfigError

log = logging.getLogger(__name__)

KEY_FILE = "controller_key.json"
# The most characters of a device id or key id a refused desired state claimed that a reason repeats.
MAX_CLAIM_CHARS = 64


def parse_public_key(text: str) -> bytes:
    """Hex of a raw Ed25519 public key -> its 32 bytes; ConfigError otherwise."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"controller public key is not hex: {text[:80]!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ConfigError(
            f"controller public key has {len(raw)} bytes, an Ed25519 key has {PUBLIC_KEY_BYTES}"
        )
    return raw


def _verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class KeyRing:
    def __init__(self, data_dir: Path, configured: bytes | None) -> None:
        self.path = Path(data_dir) / KEY_FILE
        self.configured = configured
        self.key = configured
        if configured is not None:
            self.key = self._persisted() or configured

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @property
    def key_id(self) -> str:
        return key_id(self.key) if self.key is not None else ""

    def _persisted(self) -> bytes | None:
        try:
            doc = json.loads(self.path.read_text())
            if bytes.fromhex(doc["provisioned_key"]) != self.configured:
                log.warning("rotated controller key ignored: agent.toml pins another key path=%s", self.path)
                return None
            key = bytes.fromhex(doc["public_key"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "rotated controller key unreadable, using the configured key path=%s error=%s", self.path, exc
            )
            return None
        return key if len(key) == PUBLIC_KEY_BYTES else None

    def rotate(self, rotation: fleet_pb2.KeyRotation) -> str | None:
        """Apply a rotation signed by the pinned key; returns why it was refused, if it was."""
        new = bytes(rotation.new_public_key)
        if not new or self.key is None or new == self.key:
            return None
        try:
            message = rotation_bytes(new)
        except SigningFormatError as exc:
            return f"key rotation refused: {exc}"
        if not _verifies(self.key, bytes(rotation.signature), message):
            return f"key rotation to {key_id(new)} refused: not signed by the pinned controller key {self.key_id}"
        assert self.configured is not None
        doc = {
            "public_key": new.hex(),
            "provisioned_key": self.configured.hex(),
            "previous_key": self.key.hex(),
        }
        write_atomic(self.path, json.dumps(doc, indent=1).encode())
        log.info("controller key rotated old_key=%s new_key=%s", self.key_id, key_id(new))
        self.key = new
        return None

    def follow(self, chain: Sequence[fleet_pb2.KeyRotation]) -> str | None:
        """Walk a rotation chain (oldest first) from the pinned key to its last link.

        An earlier link the pinned key did not sign is history this device already
        followed (or never needed) and is passed over; only the last link's refusal
        is reported. Nothing but signatures decides: ``old_key_id`` is not trusted."""
        if not chain or self.key is None:
            return None
        for link in chain[:-1]:
            self.rotate(link)
        return self.rotate(chain[-1])

    def admit(self, msg: fleet_pb2.DesiredState, device_id: str) -> str | None:
        """Why this desired state must be refused, or None when the controller signed it for this device.

        The rotations it carries are walked in memory first (each link verified with the key
        before it, from the pinned key); only once the state verifies with the key they lead
        to are they persisted, so a refused state changes nothing at all."""
        if self.key is None:
            return None
        what = f"desired state generation {msg.generation} refused"
        # The sender chose these strings: cut, since the reason is logged, sent and reported.
        claimed_device, claimed_key = msg.device_id[:MAX_CLAIM_CHARS], msg.state_key_id[:MAX_CLAIM_CHARS]
        if msg.device_id != device_id:
            named = f"is for device {claimed_device!r}" if msg.device_id else "names no device"
            return f"{what}: it {named}, this is {device_id!r}"
        if not msg.state_signature:
            return f"{what}: not signed by the controller (this device trusts controller key {self.key_id})"
        key, links = _walk(self.key, _rotations(msg))
        if not _verifies(key, bytes(msg.state_signature), desired_bytes(msg)):
            if msg.state_key_id and msg.state_key_id != key_id(key):
                return f"{what}: signed by key {claimed_key}, this device trusts controller key {key_id(key)}"
            return f"{what}: the signature does not match the state (key {key_id(key)}); tampered or corrupt"
        for link in links:
            self.rotate(link)
        return None

    def check(self, m: fleet_pb2.ModelAssignment) -> str | None:
        """Why this assignment must be refused, or None when it is signed by the pinned key."""
        if self.key is None:
            return None
        if not m.signature:
            return "refused: the assignment is not signed by the controller"
        try:
            message = manifest_bytes(
                m.model_name, m.model_version, m.variant, m.artifact_digest, m.artifact_size
            )
        except SigningFormatError as exc:
            return f"refused: {exc}"
        if _verifies(self.key, bytes(m.signature), message):
            return None
        if m.key_id and m.key_id != self.key_id:
            return f"refused: signed by key {m.key_id}, this device trusts controller key {self.key_id}"
        return f"refused: the signature does not match the manifest (key {self.key_id}); tampered or corrupt"

    def refusals(self, msg: fleet_pb2.DesiredState, verified: Collection[str] = ()) -> dict[str, str]:
        """Apply the desired state's key rotations, then check every assignment: digest -> reason.

        Digests in ``verified`` (what the device already runs, checked when they came) are not
        checked again: after a rotation the controller keeps the other tenants' assignments,
        signed by the old key, in the desired states it sends."""
        refused: dict[str, str] = {}
        if msg.HasField("key_rotation"):
            problem = self.rotate(msg.key_rotation)
            if problem is not None:
                log.error("key rotation refused device_key=%s reason=%s", self.key_id, problem)
        for m in msg.models:
            if m.HasField("key_rotation"):
                problem = self.follow([*m.earlier_rotations, m.key_rotation])
                if problem is not None:
                    log.error("key rotation refused device_key=%s reason=%s", self.key_id, problem)
            reason = None if m.artifact_digest in verified else self.check(m)
            if reason is not None:
                refused[m.artifact_digest] = reason
                log.error(
                    "artifact refused tenant=%s model=%s version=%s variant=%s digest=%s reason=%s",
                    tenant_or_default(m.tenant), m.model_name, m.model_version, m.variant, m.artifact_digest[:12], reason,
                )  # fmt: skip
        return refused


def _rotations(msg: fleet_pb2.DesiredState) -> list[fleet_pb2.KeyRotation]:
    """Every rotation a desired state carries, each chain oldest first: the state's own, then
    those riding on its assignments (how controllers announced rotations before states were signed)."""
    links: list[fleet_pb2.KeyRotation] = []
    if msg.HasField("key_rotation"):
        links += [*msg.earlier_rotations, msg.key_rotation]
    for m in msg.models:
        if m.HasField("key_rotation"):
            links += [*m.earlier_rotations, m.key_rotation]
    return links


def _walk(key: bytes, links: Iterable[fleet_pb2.KeyRotation]) -> tuple[bytes, list[fleet_pb2.KeyRotation]]:
    """The key the links lead to from ``key``, and the links taken; a link ``key`` did not sign is passed over."""
    taken = []
    for link in links:
        new = bytes(link.new_public_key)
        if len(new) != PUBLIC_KEY_BYTES or new == key:
            continue
        if _verifies(key, bytes(link.signature), rotation_bytes(new)):
            key = new
            taken.append(link)
    return key, taken
