"""Registered names for an ingest batch: looked up together, in a few statements whatever the
batch's size, and folded as one window at a time would be."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2

from controller.registered_names import IN_LIST, UNREGISTERED, fold_telemetry
from tests.support.model_files import add_model
from tests.unit.controller.helpers import Parts

pytestmark = pytest.mark.both_backends


def window(device_id: str, seq: int) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(device_id=device_id, seq=seq)
    msg.models.add(tenant="door", model_name="adder", model_version="1")
    msg.models.add(tenant="door.shadow", model_name="adder", model_version=f"v{seq}")
    msg.models.add(tenant="", model_name=f"made-up-{seq}", model_version="1")
    msg.tenants.add(tenant="door")
    msg.tenants.add(tenant=f"stranger-{seq}")
    msg.drift.add(tenant="door", model_name="adder", model_version="1")
    msg.drift.add(tenant="door", model_name="adder", model_version=f"v{seq}")
    return msg


@pytest.fixture
def parts(tmp_path: Path, store_url: str) -> Parts:
    p = Parts(tmp_path, database_url=store_url)
    for device_id in ("d1", "d2"):
        p.fleet.register(device_id)
    p.registry.upload("adder", "1", io.BytesIO(add_model(tmp_path / "a.onnx").read_bytes()), {})
    # "door" is declared on d1 only.
    p.store.execute("INSERT INTO device_tenants VALUES ('d1', '[{\"id\": \"door\"}]', 0)")
    return p


def counting_statements(parts: Parts) -> list[str]:
    statements: list[str] = []
    query = parts.store.query

    def counted(sql: str, params: Any = ()) -> list[dict[str, Any]]:
        statements.append(sql)
        return query(sql, params)

    parts.store.query = counted  # type: ignore[method-assign]
    return statements


def test_a_batch_of_windows_is_folded_to_registered_names(parts: Parts) -> None:
    batch = [("d1", window("d1", 1)), ("d2", window("d2", 2))]
    known = parts.telemetry.names.known(batch)
    d1, d2 = (fold_telemetry(known, device_id, msg) for device_id, msg in batch)

    assert [(m.tenant, m.model_name, m.model_version) for m in d1.models] == [
        ("door", "adder", "1"),
        ("door.shadow", "adder", UNREGISTERED),  # a version the registry does not have
        ("default", UNREGISTERED, UNREGISTERED),
    ]
    assert [t.tenant for t in d1.tenants] == ["door", UNREGISTERED]
    # Only the registered version's sketch is kept: there is no baseline for the other.
    assert [(s.tenant, s.model_version) for s in d1.drift] == [("door", "1")]
    # "door" is not declared on d2.
    assert [m.tenant for m in d2.models] == [UNREGISTERED, UNREGISTERED, "default"]
    assert [(s.tenant, s.model_version) for s in d2.drift] == [(UNREGISTERED, "1")]


def test_a_batchs_names_cost_the_same_few_statements_whatever_its_size(parts: Parts) -> None:
    statements = counting_statements(parts)
    parts.telemetry.names.known([("d1", window("d1", 1))])
    one = len(statements)

    statements.clear()
    # A thousand windows of two devices running the same models: the same statements as one.
    same = [(device_id, window(device_id, 1)) for _ in range(500) for device_id in ("d1", "d2")]
    known = parts.telemetry.names.known(same)
    assert 0 < len(statements) <= one, statements
    assert known.tenant("d1", "door") == "door" and known.model("adder", "1") == ("adder", "1")

    # Fresh names in every window: one statement per IN_LIST distinct names, not one per entry.
    statements.clear()
    big = [(device_id, window(device_id, seq)) for seq in range(2, 502) for device_id in ("d1", "d2")]
    parts.telemetry.names.known(big)
    assert len(statements) <= one + 4 * len(big) * 2 // IN_LIST, len(statements)

    # Found registered before: not looked up again.
    statements.clear()
    registered = fleet_pb2.Telemetry(device_id="d1", seq=9)
    registered.models.add(tenant="door", model_name="adder", model_version="1")
    parts.telemetry.names.known([("d1", registered)])
    assert statements == []


def test_a_name_registered_after_a_batch_counts_from_the_next_batch(parts: Parts, tmp_path: Path) -> None:
    msg = fleet_pb2.Telemetry(device_id="d2", seq=1)
    msg.models.add(tenant="door", model_name="adder", model_version="2")
    assert parts.telemetry.names.known([("d2", msg)]).model("adder", "2") == ("adder", UNREGISTERED)
    assert parts.telemetry.names.known([("d2", msg)]).tenant("d2", "door") == UNREGISTERED

    parts.registry.upload("adder", "2", io.BytesIO(add_model(tmp_path / "b.onnx").read_bytes()), {})
    parts.store.execute("INSERT INTO device_tenants VALUES ('d2', '[{\"id\": \"door\"}]', 0)")
    known = parts.telemetry.names.known([("d2", msg)])
    assert known.model("adder", "2") == ("adder", "2")
    assert known.tenant("d2", "door") == "door"
