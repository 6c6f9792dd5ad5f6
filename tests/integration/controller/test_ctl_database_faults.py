"""The controller's database going away and coming back (PostgreSQL stopped for a while), and
a second controller pointed at a SQLite file another one uses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from controller import transport as transport_mod
from controller.database_lock import DatabaseLocked
from controller.service import Controller
from tests.support.broker import Broker
from tests.support.controller_calls import acknowledged, window
from tests.support.controller_process import Ctl, init_controller, running
from tests.support.postgres import Postgres
from tests.support.waiting import wait_until

# How long the database stays away: long enough for the ingest to retry several times.
AWAY_S = 8.0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_api_answers_503_and_ingest_holds_windows_unacknowledged_while_the_database_is_away(
    ctl: Ctl, postgres: Postgres
) -> None:
    peer = ctl.device_peer(ctl.register("cam-1"))
    try:
        peer.subscribe(str(Topic("cam-1", Kind.TELEMETRY_ACK)))
        assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-1", 1)).is_failure
        wait_until(lambda: acknowledged(peer, "cam-1")[1] or None, 10, "window 1 acknowledged")

        postgres.pause()
        try:
            response = ctl.api("GET", "/v1/devices")
            assert response.status_code == 503, response.text
            detail = response.json()["detail"]
            assert "database" in detail and "cannot be reached" in detail and response.headers["retry-after"]
            assert ctl.api("POST", "/v1/devices", json={"device_id": "cam-2", "tags": []}).status_code == 503
            for seq in (2, 3):
                assert not peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), window("cam-1", seq)).is_failure
            deadline = time.monotonic() + AWAY_S
            while time.monotonic() < deadline:
                assert set(acknowledged(peer, "cam-1")) == {1}, "nothing acknowledged that is not stored"
                time.sleep(0.2)
        finally:
            postgres.resume()

        wait_until(lambda: set(acknowledged(peer, "cam-1")) == {1, 2, 3} or None, 30, "held windows stored")
        wait_until(lambda: ctl.api("GET", "/v1/devices").status_code == 200 or None, 15, "the API back")
        rows = ctl.api("GET", "/v1/devices/cam-1/telemetry").json()
        assert sorted(r["seq"] for r in rows) == [1, 2, 3]
    finally:
        peer.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_reported_states_that_find_the_queue_full_wait_for_room_the_newest_of_each_device_kept(
    broker: Broker, tmp_path: Path, store_url: str, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reported state is sent once per change: dropped when the controller is overloaded, the
    device would stay on its last stored state until it next changed. Telemetry is sent again
    until acknowledged; reported states and status wait instead, the newest of each device."""
    monkeypatch.setattr(transport_mod, "MAX_QUEUED_JOBS", 2)
    settings, token = init_controller(broker, tmp_path / "controller", database_url=store_url)
    devices = [f"cam-{i}" for i in range(6)]
    with running(broker, settings, token) as ctl:
        peers = [ctl.device_peer(ctl.register(d)) for d in devices]
        try:
            postgres.pause()
            try:
                for generation in (1, 2, 3):
                    for d, peer in zip(devices, peers, strict=True):
                        report = fleet_pb2.ReportedState(
                            device_id=d, desired_generation=generation, applied_generation=generation
                        )
                        assert not peer.publish(
                            str(Topic(d, Kind.REPORTED)), encode(report), retain=True
                        ).is_failure
                time.sleep(2)
            finally:
                postgres.resume()

            def stored() -> dict[str, int] | None:
                got = {
                    d["device_id"]: (d["reported"] or {}).get("applied_generation")
                    for d in ctl.api("GET", "/v1/devices").json()
                }
                return got if got == dict.fromkeys(devices, 3) else None

            try:
                wait_until(stored, 30, "every device's last reported state stored")
            except TimeoutError:
                got = {d["device_id"]: d["reported"] for d in ctl.api("GET", "/v1/devices").json()}
                raise AssertionError(f"stored reported states: {got}") from None
        finally:
            for peer in peers:
                peer.close()


def test_a_second_controller_on_the_same_sqlite_file_refuses_to_start(broker: Broker, tmp_path: Path) -> None:
    settings, _ = init_controller(broker, tmp_path / "controller")
    first = Controller(settings)
    try:
        with pytest.raises(DatabaseLocked) as refused:
            Controller(settings)
        message = str(refused.value)
        assert (
            "another controller" in message and str(settings.db_path) in message and "PostgreSQL" in message
        )
    finally:
        first.close()
    Controller(settings).close()  # the lock goes with the controller that held it
