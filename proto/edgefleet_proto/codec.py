"""Encode and decode the protobuf payloads of each topic kind. Pure code.

Decoding never raises anything but :class:`PayloadError`, so a receive loop has
one thing to catch and log for any malformed message.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.topics import Kind

M = TypeVar("M", bound=Message)

# Larger than any legitimate payload (a chunk is 64 KiB by default, at most
# 1 MiB); anything bigger is refused before protobuf parses it.
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024

MESSAGE_FOR_KIND: dict[Kind, type[Message]] = {
    Kind.DESIRED: fleet_pb2.DesiredState,
    Kind.DESIRED_REQUEST: fleet_pb2.DesiredRequest,
    Kind.REPORTED: fleet_pb2.ReportedState,
    Kind.STATUS: fleet_pb2.DeviceStatus,
    Kind.TELEMETRY: fleet_pb2.Telemetry,
    Kind.TELEMETRY_ACK: fleet_pb2.TelemetryAck,
    Kind.EVENTS: fleet_pb2.Event,
    Kind.ARTIFACT_REQUEST: artifact_pb2.ChunkRequest,
    Kind.ARTIFACT_RESPONSE: artifact_pb2.ArtifactResponse,
    Kind.CAPTURE: fleet_pb2.CaptureChunk,
}


class PayloadError(ValueError):
    """A payload that is not a valid message of the expected type."""


def encode(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def decode_as(cls: type[M], payload: bytes) -> M:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"{cls.DESCRIPTOR.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    message = cls()
    try:
        message.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PayloadError(f"malformed {cls.DESCRIPTOR.name} payload: {exc}") from None
    return message


def decode(kind: Kind, payload: bytes) -> Message:
    return decode_as(MESSAGE_FOR_KIND[kind], payload)
