from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2

from controller.errors import (
    BrokerAuthError,
    DeviceExists,
    DeviceNotFound,
    InvalidDeviceId,
    InvalidInputError,
)
from controller.mosquitto_auth import verify_password
from controller.roles import instance_accounts
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def passwd_lines(parts: Parts) -> dict[str, str]:
    return dict(line.split(":", 1) for line in parts.settings.passwd_file.read_text().splitlines())


def test_register_returns_the_password_once_and_stores_only_its_hash(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    creds = parts.fleet.register("cam-1", ["site:lyon", "cam", "cam"])
    assert (creds.device_id, creds.mqtt_username, creds.broker_port, creds.mqtt_protocol) == (
        "cam-1",
        "cam-1",
        1883,
        "v5",
    )
    lines = passwd_lines(parts)
    # The controller's processes each log in with an account of their own, all with its password.
    assert set(lines) == {"edgefleet-controller", *instance_accounts(), "cam-1"}
    assert verify_password(creds.mqtt_password, lines["cam-1"])
    assert verify_password("pw", lines["edgefleet-controller"])
    assert verify_password("pw", lines["edgefleet-controller-16"])
    # The whole file where it is one, else every stored row of the device.
    path = parts.store.path
    stored = path.read_bytes() if path else repr(parts.store.query("SELECT * FROM devices")).encode()
    assert creds.mqtt_password.encode() not in stored
    device = parts.fleet.get("cam-1")
    assert device.tags == ["cam", "site:lyon"] and not device.online and device.reported is None
    with pytest.raises(DeviceExists):
        parts.fleet.register("cam-1")


@pytest.mark.parametrize(
    "bad", ["", "-x", "a/b", "a+b", "x" * 65, "edgefleet-controller", "edgefleet-controller-3", "a b"]
)
def test_bad_device_ids_are_refused(tmp_path: Path, bad: str, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    with pytest.raises(InvalidDeviceId):
        parts.fleet.register(bad)
    assert parts.fleet.all() == []


def test_bad_tags_are_refused(tmp_path: Path, store_url: str) -> None:
    with pytest.raises(InvalidInputError, match="tag"):
        Parts(tmp_path, database_url=store_url).fleet.register("d", ["ok", "not ok"])


def test_registration_is_undone_when_the_broker_cannot_reload(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url, reload_command="false")
    with pytest.raises(BrokerAuthError):
        parts.fleet.register("cam-1")
    assert parts.fleet.all() == []
    with pytest.raises(DeviceNotFound):
        parts.fleet.get("cam-1")


def test_newest_message_wins_whatever_its_timestamp(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    first = fleet_pb2.ReportedState(device_id="d", desired_generation=3, reported_at_ms=2000)
    first.models.add(
        tenant="default", model_name="m", artifact_digest="a" * 64, phase=fleet_pb2.MODEL_PHASE_LOADING
    )
    # After a reboot without a real-time clock, the device's time starts over.
    rebooted = fleet_pb2.ReportedState(device_id="d", desired_generation=4, reported_at_ms=1000)
    parts.fleet.record_reported("d", first, received_at=10.0)
    device = parts.fleet.get("d")
    assert device.reported is not None and device.reported.models[0].phase == "loading"
    parts.fleet.record_reported("d", rebooted, received_at=11.0)
    device = parts.fleet.get("d")
    assert device.reported is not None and device.reported.desired_generation == 4
    assert device.reported_received_at == 11.0
    parts.fleet.record_status("d", fleet_pb2.DeviceStatus(online=True, at_ms=50, agent_version="1.2"))
    device = parts.fleet.get("d")
    assert device.online and device.agent_version == "1.2"
    # The last will was set when the agent connected, before it said "online".
    parts.fleet.record_status("d", fleet_pb2.DeviceStatus(online=False, at_ms=40, agent_version="1.2"))
    assert not parts.fleet.get("d").online
    parts.fleet.touch("d", 100.0)
    parts.fleet.touch("d", 90.0)
    assert parts.fleet.get("d").last_seen == 100.0


def test_a_report_or_status_handled_after_a_newer_one_of_the_same_device_is_not_stored(
    tmp_path: Path, store_url: str
) -> None:
    """Several ingest processes share a device's messages (a shared subscription) and do not keep
    its order: what the device numbered earlier must not overwrite what it said later."""
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")

    def report(session: int, seq: int, applied: int) -> fleet_pb2.ReportedState:
        return fleet_pb2.ReportedState(
            device_id="d", desired_generation=applied, applied_generation=applied, session=session, seq=seq
        )

    def applied() -> int:
        reported = parts.fleet.get("d").reported
        assert reported is not None
        return reported.applied_generation

    assert parts.fleet.record_reported("d", report(1000, 2, 2), received_at=10.0).kept
    late = parts.fleet.record_reported("d", report(1000, 1, 1), received_at=10.1)
    assert not late.kept and applied() == 2
    assert parts.fleet.record_reported("d", report(1000, 3, 3), received_at=10.2).kept and applied() == 3
    # The agent restarted: a later session outranks every count of the one before.
    assert parts.fleet.record_reported("d", report(2000, 1, 4), received_at=11.0).kept and applied() == 4
    assert not parts.fleet.record_reported("d", report(1000, 9, 3), received_at=11.1).kept
    # Its clock went back across a restart: once the stored report is a minute old, the newest
    # received wins again rather than leave the device unheard.
    assert not parts.fleet.record_reported("d", report(500, 1, 5), received_at=12.0).kept
    assert parts.fleet.record_reported("d", report(500, 1, 5), received_at=72.0).kept and applied() == 5
    # An agent that does not number its reports: the newest received wins, as before.
    assert parts.fleet.record_reported("d", report(0, 0, 6), received_at=72.5).kept and applied() == 6

    def status(online: bool, seq: int, session: int = 1000) -> fleet_pb2.DeviceStatus:
        return fleet_pb2.DeviceStatus(online=online, at_ms=1, agent_version="1", session=session, seq=seq)

    # Connection 1 said online (2), its will said offline (3), connection 2 online (4): handled
    # as online 2, online 4, will 3, the device is online.
    assert parts.fleet.record_status("d", status(True, 2), received_at=20.0)
    assert parts.fleet.record_status("d", status(True, 4), received_at=20.1)
    assert not parts.fleet.record_status("d", status(False, 3), received_at=20.2)
    assert parts.fleet.get("d").online
    assert parts.fleet.record_status("d", status(False, 5), received_at=20.3)
    assert not parts.fleet.get("d").online
    # A count beyond what the database holds is clamped, not an error.
    assert parts.fleet.record_status("d", status(True, 2**64 - 1, session=2**64 - 1), received_at=21.0)


def test_reported_conditions_are_kept_bounded_and_shown_in_the_api_schema(
    tmp_path: Path, store_url: str
) -> None:
    from controller.api.schemas import DevicePublic

    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("d")
    msg = fleet_pb2.ReportedState(device_id="d", desired_generation=1, reported_at_ms=5)
    msg.conditions.add(kind="disk_full", message="no space left: " + "x" * 5000, since_ms=4, count=3)
    for i in range(40):
        msg.conditions.add(kind=f"junk-{i}", message="m", since_ms=1, count=1)
    parts.fleet.record_reported("d", msg, received_at=10.0)
    device = parts.fleet.get("d")
    assert device.reported is not None
    conditions = device.reported.conditions
    assert len(conditions) == 16 and conditions[0].kind == "disk_full" and conditions[0].count == 3
    assert len(conditions[0].message) == 512
    public = DevicePublic.model_validate(device).model_dump()
    assert public["reported"]["conditions"][0]["kind"] == "disk_full"


def test_touching_many_devices_moves_each_last_seen_forward_only(tmp_path: Path, store_url: str) -> None:
    from controller.fleet import TOUCH_BATCH

    parts = Parts(tmp_path, database_url=store_url)
    devices = [f"d{i:04d}" for i in range(TOUCH_BATCH + 3)]  # two statements' worth
    for device_id in devices:
        parts.fleet.register(device_id)
    parts.fleet.touch("d0000", 50.0)

    parts.fleet.touch_many({device_id: 10.0 + i for i, device_id in enumerate(devices)} | {"nobody": 99.0})

    seen = {d.device_id: d.last_seen for d in parts.fleet.all()}
    assert seen["d0000"] == 50.0  # an older time leaves a newer one in place
    assert seen["d0001"] == 11.0
    assert seen[devices[-1]] == 10.0 + len(devices) - 1
    assert "nobody" not in seen
    parts.fleet.touch_many({})
