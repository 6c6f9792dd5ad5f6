"""POST /v1/device-batches: many devices registered at once, all or none, with one broker reload."""

from __future__ import annotations

from typing import Any

from tests.support.controller_process import Ctl


def _batch(ctl: Ctl, *ids: str) -> Any:
    return ctl.api("POST", "/v1/device-batches", json={"devices": [{"device_id": d} for d in ids]})


def test_a_batch_registers_every_device_and_each_logs_in_to_the_broker(ctl: Ctl) -> None:
    reloads = ctl.broker.log_file.read_text().count("Reloading config")
    response = ctl.api(
        "POST",
        "/v1/device-batches",
        json={"devices": [{"device_id": f"cam-{i}", "tags": ["lobby"]} for i in range(50)]},
    )
    assert response.status_code == 201, response.text
    creds = response.json()
    assert [c["device_id"] for c in creds] == [f"cam-{i}" for i in range(50)]
    assert len({c["mqtt_password"] for c in creds}) == 50
    assert all(c["controller_public_key"] == ctl.controller.signer.public_key_hex for c in creds)
    for c in (creds[0], creds[-1]):
        peer = ctl.device_peer(c)
        peer.close()
    devices = ctl.api("GET", "/v1/devices").json()
    assert sorted(d["device_id"] for d in devices) == sorted(f"cam-{i}" for i in range(50))
    assert all(d["tags"] == ["lobby"] for d in devices)
    assert ctl.broker.log_file.read_text().count("Reloading config") - reloads <= 1


def test_a_batch_with_a_registered_or_repeated_id_registers_nothing(ctl: Ctl) -> None:
    ctl.register("cam-1")
    taken = _batch(ctl, "cam-0", "cam-1", "cam-2")
    assert taken.status_code == 409, taken.text
    assert "cam-1" in taken.json()["detail"]
    twice = _batch(ctl, "cam-3", "cam-3")
    assert twice.status_code == 422
    assert "cam-3" in twice.json()["detail"]
    assert _batch(ctl, "cam-4", "has/slash").status_code == 422
    assert ctl.api("POST", "/v1/device-batches", json={"devices": []}).status_code == 422
    assert [d["device_id"] for d in ctl.api("GET", "/v1/devices").json()] == ["cam-1"]
