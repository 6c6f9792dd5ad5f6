"""A device's reported states are rate-limited like its events, on a real mosquitto and real
SQLite with a device client holding the device's own credentials; since a reported state is a
snapshot, the newest one held back is the one handled once the device's bucket allows, so the
controller ends on what the device last said."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic
from prometheus_client.parser import text_string_to_metric_families

from controller import settings as settings_mod
from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, running
from tests.support.waiting import wait_until


@contextmanager
def controller(broker: Broker, data_dir: Path, **limits: Any) -> Iterator[Ctl]:
    settings, token = init_controller(broker, data_dir)
    settings_mod.save(settings.with_changes(**limits))
    with running(broker, settings_mod.load(data_dir), token) as ctl:
        yield ctl


def held_back(ctl: Ctl) -> float:
    text = ctl.api("GET", "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgefleet_device_rate_limited_total"
        and s.labels == {"device": "cam-1", "limit": "reported"}
    )


def applied(ctl: Ctl) -> int | None:
    reported = ctl.api("GET", "/v1/devices/cam-1").json()["reported"]
    return reported["applied_generation"] if reported else None


def test_a_flood_of_reported_states_is_rate_limited_and_the_newest_one_wins(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flood = 300
    with controller(broker, tmp_path / "controller", reported_per_s=2.0, reported_burst=10) as ctl:
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            start = time.monotonic()
            for generation in range(1, flood + 1):
                msg = fleet_pb2.ReportedState(
                    device_id="cam-1", desired_generation=generation, applied_generation=generation
                )
                peer.publish(str(Topic("cam-1", Kind.REPORTED)), encode(msg), retain=True)
            # The last one said is the one the controller keeps, however many were held back.
            wait_until(lambda: applied(ctl) == flood or None, 30, "the newest reported state handled")
            elapsed = time.monotonic() - start
            wait_until(
                lambda: held_back(ctl) >= flood - 10 - 2 * elapsed - 1 or None, 10, "held back, counted"
            )
        finally:
            peer.close()
    handled = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("controller") and r.getMessage().startswith("reported state device=cam-1 ")
    ]
    assert 0 < len(handled) <= 10 + 2 * elapsed + 1, (len(handled), elapsed)
