"""The controller's database going away and coming back (PostgreSQL stopped for a while), and
a second controller pointed at a SQLite file another one uses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from edgefleet_proto.topics import Kind, Topic

from controller.database_lock import DatabaseLocked
from controller.service import Controller
from tests.broker import Broker
from tests.integration.controller.conftest import Ctl, init_controller, wait_for
from tests.integration.controller.test_ctl_telemetry_ack import acknowledged, window
from tests.postgres import Postgres

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
        wait_for(lambda: acknowledged(peer, "cam-1")[1] or None, 10, "window 1 acknowledged")

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

        wait_for(lambda: set(acknowledged(peer, "cam-1")) == {1, 2, 3} or None, 30, "held windows stored")
        wait_for(lambda: ctl.api("GET", "/v1/devices").status_code == 200 or None, 15, "the API back")
        rows = ctl.api("GET", "/v1/devices/cam-1/telemetry").json()
        assert sorted(r["seq"] for r in rows) == [1, 2, 3]
    finally:
        peer.close()


def test_a_second_controller_on_the_same_sqlite_file_refuses_to_start(broker: Broker, tmp_path: Path) -> None:
    settings, _ = init_controller(broker, tmp_path / "controller")
    first = Controller(settings)
    try:
        with pytest.raises(DatabaseLocked) as refused:
            Controller(settings)
        message = str(refused.value)
        assert "another controller" in message and str(settings.db_path) in message and "PostgreSQL" in message
    finally:
        first.close()
    Controller(settings).close()  # the lock goes with the controller that held it
