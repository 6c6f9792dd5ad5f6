"""Tenants the controller declares on a device: validation, storage, the desired state that carries them."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as
from prometheus_client.parser import text_string_to_metric_families

from controller import metrics
from controller.api.schemas import TelemetryPublic
from controller.baselines import Baselines
from controller.capture_policies import DesiredMonitoring
from controller.cli import CommandError, tenants_from_toml
from controller.errors import InvalidInputError
from controller.rollups import Retention, Rollups
from controller.tenants import DeviceTenants, InvalidTenantSpec, Source, parse_tenants
from tests.support.model_files import add_model
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends

TOKEN = "door-app-token-0123456789"


def spec(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "door",
        "model": "adder",
        "source": {"kind": "csv", "uri": "/srv/rows.csv", "options": {"loop": True, "skip_header": True}},
        "preprocess": {"window": 1, "dtype": "float32", "mean": [0.5, 0.25]},
        "rate_hz": 20,
        "weight": 2.0,
        "queue": 8,
        "results": ["grpc", "mqtt"],
        "token": TOKEN,
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (spec(id="a.shadow"), "invalid tenant id 'a.shadow'"),
        (spec(id=""), "invalid tenant id ''"),
        (spec(source={"kind": "webcam", "uri": "0"}), "unknown source kind 'webcam'"),
        (spec(source={"kind": "csv"}), "a csv source needs a uri"),
        (spec(source={"kind": "csv", "uri": "x", "options": {"fps": 3}}), "unknown option(s) ['fps']"),
        (spec(model=""), "tenant 'door'.model: missing"),
        (spec(model="nope"), "unknown model 'nope'"),
        (spec(weight=0), "tenant 'door'.weight: must be a number greater than 0"),
        (spec(weight=-1.5), "tenant 'door'.weight"),
        (spec(queue=0), "tenant 'door'.queue: must be a whole number greater than 0"),
        (spec(rate_hz=-1), "tenant 'door'.rate_hz: must be a number at least 0"),
        (spec(results=["file"]), "results: must be some of grpc, mqtt"),
        (spec(token="short"), "at least 16 characters"),
        (spec(preprocess={"zoom": 2}), "unknown key(s) ['zoom']"),
        (spec(preprocess={"resize": [224]}), "preprocess.resize: expected 2 integers"),
        (spec(preprocess={"layout": "chw"}), "preprocess.layout: must be one of nhwc, nchw"),
        (spec(preprocess={"std": "0.2,0"}), "would divide by zero"),
    ],
)
def test_an_invalid_tenant_spec_is_refused_naming_the_problem(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidTenantSpec) as caught:
        parse_tenants([doc], {"adder"})
    assert problem in str(caught.value)


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidTenantSpec, match="'door' is declared twice"):
        parse_tenants([spec(), spec(token="")], {"adder"})


def test_a_valid_spec_becomes_the_agents_text_form_with_only_the_token_hash() -> None:
    (tenant,) = parse_tenants([spec()], {"adder"})
    msg = tenant.to_proto()
    assert msg.tenant == "door" and msg.model_name == "adder"
    assert msg.source.kind == "csv" and dict(msg.source.options) == {"loop": "true", "skip_header": "true"}
    assert dict(msg.preprocess) == {"dtype": "float32", "mean": "0.5,0.25", "window": "1"}
    assert (msg.target_rate_hz, msg.weight, msg.queue_bound) == (20.0, 2.0, 8)
    assert list(msg.results) == ["grpc", "mqtt"]
    assert msg.token_sha256 == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert TOKEN not in str(msg)


class Published:
    def __init__(self) -> None:
        self.sent: list[tuple[str, fleet_pb2.DesiredState]] = []

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.sent.append((device_id, decode_as(fleet_pb2.DesiredState, payload)))


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    p.fleet.register("d1")
    p.registry.upload("adder", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    return p


def test_put_stores_the_tenants_and_issues_a_desired_state_once(parts: Parts) -> None:
    tenants, sent = DeviceTenants(parts.store), Published()
    tenants.publisher = sent
    tenants.put("d1", [spec()])
    assert [t.id for t in tenants.get("d1")] == ["door"]
    ((device, desired),) = sent.sent
    assert device == "d1" and desired.generation == 1 and [t.tenant for t in desired.tenants] == ["door"]
    assert parts.fleet.get("d1").desired_generation == 1

    tenants.put("d1", [spec()])  # the same list: nothing to re-issue
    assert len(sent.sent) == 1
    tenants.put("d1", [])
    assert sent.sent[-1][1].generation == 2 and not sent.sent[-1][1].tenants


def test_bad_input_changes_nothing(parts: Parts) -> None:
    tenants = DeviceTenants(parts.store)
    tenants.put("d1", [spec()])
    with pytest.raises(InvalidInputError, match="unknown device nope"):
        tenants.put("nope", [spec()])
    with pytest.raises(InvalidTenantSpec):
        tenants.put("d1", [spec(id="other"), spec(weight=0)])
    assert [t.id for t in tenants.get("d1")] == ["door"]
    assert parts.fleet.get("d1").desired_generation == 1


def test_a_rollout_keeps_the_tenants_and_the_maintenance_tick_restores_them(parts: Parts) -> None:
    tenants = DeviceTenants(parts.store)
    tenants.put("d1", [spec()])
    parts.rollouts.create("adder", "1", ["d1"], tenant="door")
    stored = decode_as(fleet_pb2.DesiredState, parts.fleet.desired_states()[0][1])
    assert stored.generation == 2 and [t.tenant for t in stored.tenants] == ["door"]
    assert [m.tenant for m in stored.models] == ["door"]

    # A desired state that lost them (written by an older controller) is re-issued with them.
    del stored.tenants[:]
    parts.store.execute(
        "UPDATE devices SET desired = ? WHERE device_id = 'd1'", (stored.SerializeToString(),)
    )
    monitoring = DesiredMonitoring(parts.store, Baselines(parts.store, 60))
    assert monitoring.reconcile() == ["d1"]
    again = decode_as(fleet_pb2.DesiredState, parts.fleet.desired_states()[0][1])
    assert again.generation == 3 and [t.tenant for t in again.tenants] == ["door"]
    assert monitoring.reconcile() == []


def window(seq: int, dropped: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id="d1", seq=seq, window_start_ms=0, window_end_ms=seq * 10)
    msg.tenants.add(
        tenant="door", samples=50, inferences=48, dropped=dropped, errors=1, rate_hz=4.8,
        latency_p50_ms=2.0, latency_p95_ms=3.0, latency_p99_ms=4.0, weight=2.0, busy_s=0.1,
    )  # fmt: skip
    return msg


def test_tenant_stats_are_served_with_their_window_and_counted_on_metrics(parts: Parts) -> None:
    # Labels carry registered names only: door is declared on d1.
    parts.store.execute("INSERT INTO device_tenants VALUES ('d1', '[{\"id\": \"door\"}]', 0)")
    assert parts.telemetry.ingest_telemetry("d1", window(1, dropped=2), received_at=1.0)
    assert parts.telemetry.ingest_telemetry("d1", window(2, dropped=3), received_at=2.0)
    assert not parts.telemetry.ingest_telemetry("d1", window(2, dropped=3), received_at=3.0)  # a resend
    newest = TelemetryPublic.model_validate(parts.telemetry.telemetry("d1")[0])
    (door,) = newest.tenants
    assert (door.tenant, door.inferences, door.dropped, door.latency_p95_ms) == ("door", 48, 3, 3.0)

    sources = metrics.Sources(
        parts.store, Rollups(parts.store, 60, Retention(86400, 86400)), Baselines(parts.store, 60), list
    )
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render(sources).decode())
        for s in family.samples
    }
    labels = (("device", "d1"), ("tenant", "door"))
    assert got[("edgefleet_tenant_dropped_total", labels)] == 5
    assert got[("edgefleet_tenant_errors_total", labels)] == 2


def test_the_cli_reads_agent_toml_tenants_into_the_api_form() -> None:
    text = """
[[tenants]]
id = "door"
model = "adder"
weight = 3.0
[tenants.source]
kind = "video"
uri = "/srv/door.avi"
loop = true
[tenants.preprocess]
resize = [32, 32]
"""
    (doc,) = tenants_from_toml(text, "tenants.toml")
    assert doc["source"] == {"kind": "video", "uri": "/srv/door.avi", "options": {"loop": True}}
    (tenant,) = parse_tenants([doc], {"adder"})
    assert tenant.source == Source("video", "/srv/door.avi", {"loop": "true"}) and tenant.weight == 3.0
    assert tenant.preprocess == {"resize": "32,32"}
    with pytest.raises(CommandError, match=r"tenants\.toml: invalid TOML"):
        tenants_from_toml("[[tenants]\n", "tenants.toml")
    # The API's own shape, options in a table of their own, reads the same.
    nested = '[[tenants]]\nid = "mic"\nmodel = "vad"\n[tenants.source]\nkind = "wav"\nuri = "/srv/a.wav"\n'
    nested += "[tenants.source.options]\nloop = true\nchunk = 512\n"
    (doc,) = tenants_from_toml(nested, "tenants.toml")
    assert doc["source"] == {"kind": "wav", "uri": "/srv/a.wav", "options": {"loop": True, "chunk": 512}}


def test_postprocess_and_input_feeds_are_checked_and_travel_to_the_agent() -> None:
    from agent.tenants import from_proto

    doc = {
        "id": "vad",
        "model": "vad",
        "postprocess": {"kind": "threshold", "threshold": 0.6, "labels": ["speech"]},
        "inputs": {
            "sr": {"role": "constant", "value": 16000, "dtype": "int64"},
            "state": {"role": "state", "from": "stateN", "shape": [2, 1, 128], "value": -0.5},
        },
    }
    (tenant,) = parse_tenants([doc], {"vad"})
    spec = from_proto(tenant.to_proto())
    assert spec.postprocess.threshold == 0.6 and spec.postprocess.labels == ("speech",)
    assert [(f.name, f.value, f.shape, f.from_output) for f in spec.inputs] == [
        ("sr", (16000.0,), (), ""),
        ("state", (-0.5,), (2, 1, 128), "stateN"),
    ]
    bad = {**doc, "inputs": {"state": {"role": "state"}}}
    with pytest.raises(InvalidTenantSpec, match=r"tenant 'vad'.inputs.state.from"):
        parse_tenants([bad], {"vad"})
    with pytest.raises(InvalidTenantSpec, match=r"postprocess.kind"):
        parse_tenants([{**doc, "postprocess": {"kind": "boxes"}}], {"vad"})
