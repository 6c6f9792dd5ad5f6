from __future__ import annotations

import pytest
from edgefleet_proto.topics import Kind, Topic, TopicError, fleet_subscription, validate_device_id


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    topic = Topic("cam-1", kind)
    assert Topic.parse(str(topic)) == topic


def test_topic_string_layout() -> None:
    assert str(Topic("cam-1", Kind.ARTIFACT_REQUEST)) == "edgefleet/v1/devices/cam-1/artifact/request"
    assert fleet_subscription(Kind.TELEMETRY) == "edgefleet/v1/devices/+/telemetry"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/v1/devices/cam-1/desired", "not under"),
        ("edgefleet/v1/devices/cam-1", "no kind"),
        ("edgefleet/v1/devices/cam-1/firmware", "unknown kind"),
        ("edgefleet/v1/devices/cam-1/artifact/other", "unknown kind"),
        ("edgefleet/v1/devices/+/desired", "invalid device id"),
        ("edgefleet/v1/devices//desired", "invalid device id"),
    ],
)
def test_foreign_topics_are_refused_with_the_reason(topic: str, reason: str) -> None:
    with pytest.raises(TopicError, match=reason):
        Topic.parse(topic)


@pytest.mark.parametrize("device_id", ["", "-lead", "a/b", "a+b", "a#", "x" * 65, "caf\u00e9", "a b"])
def test_bad_device_ids(device_id: str) -> None:
    with pytest.raises(TopicError, match="invalid device id"):
        validate_device_id(device_id)


@pytest.mark.parametrize("device_id", ["cam-1", "A", "gw_7.north", "x" * 64])
def test_good_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
