"""Capture policies and drift specs in the desired state: the pure decoration and the re-issue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as, encode

from controller.baselines import Baselines
from controller.capture_policies import DesiredMonitoring, decorate, parse_capture_policy
from controller.errors import InvalidPolicy, NotFoundError
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def desired(*assignments: tuple[str, str, str], generation: int = 3) -> fleet_pb2.DesiredState:
    d = fleet_pb2.DesiredState(device_id="cam-1", generation=generation)
    for tenant, model, version in assignments:
        d.models.add(tenant=tenant, model_name=model, model_version=version)
    return d


SPEC = fleet_pb2.DriftSpec(model_name="digits", model_version="1", num_classes=10)
POLICY = fleet_pb2.CapturePolicy(tenant="cam", model_name="digits", policy_id="p", random_fraction=0.1)


def test_decorate_adds_exactly_what_the_assignments_need() -> None:
    d = desired(("cam", "digits", "1"), ("mic", "kws", "2"))
    d.drift_specs.add(model_name="stale")
    out = decorate(
        d,
        {("digits", "1"): SPEC, ("digits", "2"): SPEC},
        {("digits", "cam"): POLICY, ("digits", "x"): POLICY},
    )
    assert [(s.tenant, s.model_name, s.model_version) for s in out.drift_specs] == [("cam", "digits", "1")]
    assert [p.policy_id for p in out.capture_policies] == ["p"]
    assert out.generation == 3 and list(out.models) == list(d.models)
    assert len(d.drift_specs) == 1  # the input is not changed
    assert decorate(out, {("digits", "1"): SPEC}, {("digits", "cam"): POLICY}) == out


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "at least one"),
        ({"random_fraction": 1.5}, "between 0 and 1"),
        ({"random_fraction": 0.1, "max_samples_per_hour": -1}, "whole number"),
        ({"random_fraction": 0.1, "colour": "red"}, "unknown capture policy fields: colour"),
    ],
)
def test_bad_capture_policies_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        parse_capture_policy("digits", "default", doc)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.sent.append((device_id, payload))


def test_reconcile_reissues_changed_desired_states_once(tmp_path: Path, store_url: str) -> None:
    parts = Parts(tmp_path, database_url=store_url)
    parts.fleet.register("cam-1")
    parts.fleet.register("cam-2")
    parts.store.execute(
        "UPDATE devices SET desired_generation = 3, desired = ? WHERE device_id = 'cam-1'",
        (encode(desired(("default", "digits", "1"))),),
    )
    baselines = Baselines(parts.store, 60, clock=lambda: 1.0)
    monitoring = DesiredMonitoring(parts.store, baselines, clock=lambda: 2.0)
    monitoring.publisher = recorder = Recorder()
    assert monitoring.reconcile() == []
    with pytest.raises(NotFoundError):
        monitoring.get("digits", "default")

    baselines.set_reference("digits", "1", np.random.default_rng(0).normal(size=(100, 3)), None, bins=4)
    policy = monitoring.put("digits", "default", {"random_fraction": 0.05, "low_confidence_below": 0.5})
    assert policy["version"] == 1 and policy["max_samples_per_hour"] == 600
    assert monitoring.reconcile() == ["cam-1"]
    ((device, payload),) = recorder.sent
    sent = decode_as(fleet_pb2.DesiredState, payload)
    assert device == "cam-1" and sent.generation == 4 and sent.issued_at_ms == 2000
    (spec,) = sent.drift_specs
    assert spec.tenant == "default" and [h.name for h in spec.features] == ["f0", "f1", "f2"]
    (capture,) = sent.capture_policies
    assert capture.policy_id == "digits.default.capture-v1" and capture.low_confidence_below == 0.5
    assert monitoring.reconcile() == [] and len(recorder.sent) == 1  # converged

    monitoring.put("digits", "default", {"random_fraction": 0.2})
    assert monitoring.reconcile() == ["cam-1"]
    assert (
        decode_as(fleet_pb2.DesiredState, recorder.sent[-1][1]).capture_policies[0].policy_id.endswith("v2")
    )
    row = parts.store.query_one("SELECT desired_generation FROM devices WHERE device_id = 'cam-1'")
    assert row is not None and row["desired_generation"] == 5
