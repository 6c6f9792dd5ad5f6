"""Revoking a device that logs in with a password, on a real mosquitto (plain listener) and
real SQLite: its password leaves the broker, the session it holds is ended by the controller
logging in with its client id, it cannot log in again, and what it sent before stays while
what it sends later is ignored."""

from __future__ import annotations

import threading

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_process import Ctl
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until


def test_a_revoked_device_loses_its_password_and_its_session(ctl: Ctl) -> None:
    creds = ctl.register("cam-gone")
    other = ctl.device_peer(ctl.register("cam-stays"))
    peer = ctl.device_peer(creds)
    ended = threading.Event()
    peer.client.on_disconnect = lambda *args: ended.set()
    try:
        status = fleet_pb2.DeviceStatus(online=True, at_ms=1, agent_version="test")
        peer.publish(str(Topic("cam-gone", Kind.STATUS)), encode(status), retain=True)
        wait_until(lambda: ctl.api("GET", "/v1/devices/cam-gone").json()["online"], 10, "cam-gone online")

        response = ctl.api("POST", "/v1/devices/cam-gone/revoke", json={"reason": "retired"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["certificates_revoked"], body["session_ended"], body["reason"]) == ([], True, "retired")
        assert ended.wait(10), "the broker ended the device's session"
        device = ctl.api("GET", "/v1/devices/cam-gone").json()
        assert device["revoked_at"] == body["revoked_at"] and not device["online"]

        # Its password is refused from now on; the other device's is not.
        with pytest.raises(ConnectionError, match=r"Not authorized|Bad user name or password"):
            Peer(ctl.broker.port, creds["mqtt_username"], creds["mqtt_password"], client_id="cam-gone")
        window = fleet_pb2.Telemetry(device_id="cam-stays", seq=1, window_start_ms=1, window_end_ms=2)
        assert not other.publish(str(Topic("cam-stays", Kind.TELEMETRY)), encode(window)).is_failure
        wait_until(
            lambda: ctl.api("GET", "/v1/devices/cam-stays/telemetry").json(), 10, "cam-stays telemetry"
        )

        # Revoking again is harmless, and a revoked device's id is not registered again.
        assert ctl.api("POST", "/v1/devices/cam-gone/revoke").status_code == 200
        assert ctl.api("POST", "/v1/devices", json={"device_id": "cam-gone"}).status_code == 409
        assert ctl.api("POST", "/v1/devices/cam-nobody/revoke").status_code == 404
    finally:
        peer.client.loop_stop()
        other.close()
    assert "cam-gone:" not in ctl.settings.passwd_file.read_text()
    # A broker that asks the controller at each login and publish (/broker/*) is refused too.
    fleet = ctl.controller.fleet
    assert fleet.password_hash("cam-gone") is None and not fleet.is_known("cam-gone")
    assert fleet.password_hash("cam-stays") is not None
