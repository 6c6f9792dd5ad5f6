from __future__ import annotations

import pytest
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import MAX_PAYLOAD_BYTES, MESSAGE_FOR_KIND, PayloadError, decode, decode_as, encode
from edgefleet_proto.topics import Kind


def test_every_kind_has_a_message() -> None:
    assert set(MESSAGE_FOR_KIND) == set(Kind)


def test_desired_state_round_trip() -> None:
    desired = fleet_pb2.DesiredState(
        device_id="cam-1",
        generation=7,
        models=[
            fleet_pb2.ModelAssignment(
                tenant="default", model_name="digits", model_version="1", artifact_digest="ab" * 32
            )
        ],
    )
    decoded = decode(Kind.DESIRED, encode(desired))
    assert decoded == desired


def test_encoding_is_deterministic_for_maps() -> None:
    a = fleet_pb2.Event(kind="k", attributes={"x": "1", "y": "2", "z": "3"})
    b = fleet_pb2.Event(kind="k", attributes={"z": "3", "y": "2", "x": "1"})
    assert encode(a) == encode(b)


def test_optional_temperature_is_absent_unless_set() -> None:
    stats = decode_as(fleet_pb2.SystemStats, encode(fleet_pb2.SystemStats(cpu_percent=3.0)))
    assert not stats.HasField("temperature_c")
    stats = decode_as(fleet_pb2.SystemStats, encode(fleet_pb2.SystemStats(temperature_c=0.0)))
    assert stats.HasField("temperature_c")


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08"])
def test_garbage_is_a_payload_error(kind: Kind, payload: bytes) -> None:
    with pytest.raises(PayloadError, match="malformed"):
        decode(kind, payload)


def test_oversized_payload_refused_before_parsing() -> None:
    with pytest.raises(PayloadError, match="exceeds"):
        decode_as(artifact_pb2.ArtifactResponse, b"\x00" * (MAX_PAYLOAD_BYTES + 1))


def test_artifact_response_oneof() -> None:
    resp = artifact_pb2.ArtifactResponse(
        chunk=artifact_pb2.Chunk(digest="d", index=3, offset=3 * 65536, data=b"x")
    )
    decoded = decode_as(artifact_pb2.ArtifactResponse, encode(resp))
    assert decoded.WhichOneof("body") == "chunk"
    assert decoded.chunk.index == 3
