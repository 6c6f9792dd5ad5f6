from __future__ import annotations

from pathlib import Path

from edgefleet_proto import fleet_pb2

from agent.state import Assignment, Desired, DeviceState, Failure, Installed, StateStore, TenantState


def sample() -> DeviceState:
    a = Assignment("default", "m", "2", "a" * 64, 10, "onnx", "onnxruntime", "r2")
    b = Assignment("default", "m", "1", "b" * 64, 10, "onnx", "onnxruntime", "r1")
    return DeviceState(
        desired=Desired(3, (a,)),
        applied_generation=2,
        tenants={"default": TenantState(Installed(a, "/m/a.onnx"), Installed(b, "/m/b.onnx"))},
        failures={"c" * 64: Failure("c" * 64, "sha256 mismatch", 3)},
    )


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.load() == DeviceState()
    store.save(sample())
    assert StateStore(tmp_path / "state.json").load() == sample()
    assert sample().desired_generation == 3


def test_unreadable_state_is_moved_aside_and_the_device_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1, "tenants": ')
    assert StateStore(path).load() == DeviceState()
    assert not path.exists()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_desired_from_proto_defaults_the_tenant() -> None:
    msg = fleet_pb2.DesiredState(
        generation=5,
        models=[fleet_pb2.ModelAssignment(model_name="m", model_version="1", artifact_digest="d")],
    )
    d = Desired.from_proto(msg)
    assert d.generation == 5
    assert d.for_tenant("default") == Assignment("default", "m", "1", "d", 0, "onnx", "", "")
