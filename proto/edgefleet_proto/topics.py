"""MQTT topic names as validated value objects.

Every topic lives under ``edgefleet/v1/devices/{device_id}/{kind}``; the broker's
ACL pattern allows a device only its own subtree, so the device id in the topic
is the authenticated sender. Pure code: no I/O.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # devices on Python 3.10 (Ubuntu 22.04, JetPack 6); the contract needs protobuf only
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)


PREFIX = "edgefleet/v1/devices"

# MQTT forbids wildcards and NUL in topic levels, the ACL pattern needs no '/',
# and device ids become file names and MQTT usernames: keep them boring.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopicError(ValueError):
    """A topic or device id that is not part of the contract."""


class Kind(StrEnum):
    DESIRED = "desired"
    # agent -> controller: a request for the device's desired state, answered from the database.
    DESIRED_REQUEST = "desired/request"
    REPORTED = "reported"
    STATUS = "status"
    TELEMETRY = "telemetry"
    # controller -> agent: these telemetry windows are stored (TelemetryAck).
    TELEMETRY_ACK = "telemetry/ack"
    EVENTS = "events"
    ARTIFACT_REQUEST = "artifact/request"
    ARTIFACT_RESPONSE = "artifact/response"
    CAPTURE = "capture"


def validate_device_id(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Topic:
    device_id: str
    kind: Kind

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)

    def __str__(self) -> str:
        return f"{PREFIX}/{self.device_id}/{self.kind.value}"

    @classmethod
    def parse(cls, topic: str) -> Topic:
        prefix = PREFIX + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
        device_id, sep, rest = topic[len(prefix) :].partition("/")
        if not sep:
            raise TopicError(f"topic {topic!r} has no kind after the device id")
        try:
            kind = Kind(rest)
        except ValueError:
            raise TopicError(f"topic {topic!r} has unknown kind {rest!r}") from None
        return cls(device_id, kind)


def device_subscription(device_id: str, kind: Kind) -> str:
    return str(Topic(device_id, kind))


def fleet_subscription(kind: Kind) -> str:
    """Wildcard filter matching ``kind`` for every device (controller side)."""
    return f"{PREFIX}/+/{kind.value}"
