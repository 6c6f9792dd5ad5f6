"""The updater on real model files, state file and pool, with the broker away (nothing to fetch).

Version 1 is committed, version 2 is on probation, and the controller wants another
version: the probation ends, and whatever comes next has version 1 to fall back on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.topics import Kind

from agent.artifacts import ArtifactStore
from agent.pool import ModelPool
from agent.signing import KeyRing
from agent.state import StateStore, Update
from agent.updater import Updater
from tests.support.model_bytes import linear_model, write_model


class LinkDown:
    """The MQTT link while the broker is away: the planner publishes nothing."""

    connected = False

    def topic(self, kind: Kind) -> str:
        raise AssertionError("nothing is published while the link is down")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        raise AssertionError("nothing is published while the link is down")


class Device:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.now = 0.0
        self.counts: dict[str, tuple[int, int]] = {}  # version -> (inferences, errors)
        self.events: list[tuple[str, str, str, dict[str, str]]] = []
        self.pool = ModelPool(threads=1, clock=lambda: self.now)
        self.built = data_dir / "built"
        self.built.mkdir()
        self.digests = {
            v: write_model(self.built / v, linear_model(seed, 4, 3))
            for v, seed in (("1", 1), ("2", 2), ("3", 3))
        }
        self.updater = self.start()

    def arrived(self, version: str) -> None:
        """The artifact of ``version`` downloaded and verified, as :meth:`Updater.verify` leaves it."""
        digest = self.digests[version]
        path = self.data_dir / "models" / f"{digest}.onnx"
        if not path.exists():
            path.write_bytes((self.built / version).read_bytes())
            self.updater.installed.add(digest)

    def start(self) -> Updater:
        updater = Updater(
            "dev-1",
            StateStore(self.data_dir / "state.json"),
            ArtifactStore(self.data_dir),
            self.pool,
            LinkDown(),
            lambda *event: self.events.append(event),
            "test",
            clock=lambda: self.now,
            keys=KeyRing(self.data_dir, None),
            probe=lambda tenant, name, version: self.counts.get(version, (0, 0)),
        )
        updater.boot()
        return updater

    def want(self, generation: int, version: str, probation_s: float = 0.0) -> None:
        m = fleet_pb2.ModelAssignment(
            tenant="default",
            model_name="linear",
            model_version=version,
            artifact_digest=self.digests[version],
            format="onnx",
            runtime="onnxruntime",
            probation_s=probation_s,
            max_error_rate=0.1,
        )
        if version != "3":
            self.arrived(version)
        desired = fleet_pb2.DesiredState(device_id="dev-1", generation=generation, models=[m])
        assert self.updater.on_desired(desired) is None
        self.updater.converge()

    def persisted(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "state.json").read_text())
        return doc

    def versions(self) -> tuple[str | None, str | None]:
        """(active, previous) versions in the state file."""
        ts = self.persisted()["tenants"]["default"]
        return tuple(x["assignment"]["model_version"] if x else None for x in (ts["active"], ts["previous"]))  # type: ignore[return-value]

    def update(self) -> tuple[str, str, str]:
        u = self.persisted()["updates"]["default"]
        return u["assignment"]["model_version"], u["state"], u["reason"]

    def outcomes(self) -> list[tuple[str, str, str]]:
        return [
            (attrs["version"], attrs["outcome"], severity)
            for kind, severity, _, attrs in self.events
            if kind == "update_outcome"
        ]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    d = Device(tmp_path)
    d.want(1, "1")
    assert d.update()[:2] == ("1", "committed")
    d.now = 10.0
    d.want(2, "2", probation_s=60.0)
    assert d.update()[:2] == ("2", "probation")
    assert d.versions() == ("2", "1")
    return d


def test_a_newer_version_during_probation_falls_back_on_the_committed_model_not_the_one_on_probation(
    device: Device,
) -> None:
    device.want(3, "3", probation_s=60.0)
    assert device.versions() == ("1", None), "version 2 was rolled back before version 3 arrived"
    assert device.update() == ("2", "rolled_back", "superseded by linear 3 (desired generation 3)")
    device.arrived("3")
    device.updater.converge()
    assert device.versions() == ("3", "1"), "version 3's rollback target is version 1, the committed one"
    assert device.update()[:2] == ("3", "probation")
    assert ("2", "rolled_back", "warning") in device.outcomes()
    held = device.pool.held("default")
    serving = device.pool.get("default")
    assert held is not None and held.model_version == "1"
    assert serving is not None and serving.model_version == "3"

    device.counts["3"] = (10, 5)  # version 3 fails its probation
    device.updater.converge()
    assert device.versions() == ("1", None)
    assert device.update()[:2] == ("3", "rolled_back")
    serving = device.pool.get("default")
    assert serving is not None and serving.model_version == "1"
    assert device.pool.held("default") is None
    assert device.outcomes()[-1] == ("3", "rolled_back", "error")


def test_the_controller_rolling_back_during_probation_serves_the_committed_model_and_releases_the_candidate(
    device: Device,
) -> None:
    device.want(3, "1")
    assert device.versions() == ("1", None)
    version, state, reason = device.update()
    assert (version, state) == ("2", "rolled_back")
    assert reason == "the controller rolled back to linear 1 (desired generation 3)"
    serving = device.pool.get("default")
    assert serving is not None and serving.model_version == "1"
    assert device.pool.held("default") is None
    v1 = device.data_dir / "models" / f"{device.digests['1']}.onnx"
    assert device.pool.loaded_bytes() == v1.stat().st_size, "only version 1 is loaded"
    assert device.persisted()["applied_generation"] == 3
    # Version 2 is not wanted any more: its file goes once the device converged.
    assert not (device.data_dir / "models" / f"{device.digests['2']}.onnx").exists()


def test_a_restart_during_the_rollback_of_a_superseded_probation_ends_on_the_committed_model(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a SIGKILL right after "rollback" was persisted leaves on disk.
    states = device.updater.states
    state = device.updater.state
    update = state.updates["default"]
    state = state.with_update("default", Update(update.assignment, "rollback", "superseded by linear 3"))
    states.save(state)
    device.pool = ModelPool(threads=1, clock=lambda: device.now)
    device.updater = device.start()
    assert device.versions() == ("1", None)
    assert device.update() == ("2", "rolled_back", "superseded by linear 3")
    serving = device.pool.get("default")
    assert serving is not None and serving.model_version == "1"


def test_removing_the_tenant_during_probation_reports_the_update_rolled_back_and_releases_both_models(
    device: Device,
) -> None:
    assert device.pool.held("default") is not None, "version 1 is held while version 2 is on probation"
    desired = fleet_pb2.DesiredState(device_id="dev-1", generation=3)  # assigns no tenant at all
    assert device.updater.on_desired(desired) is None
    device.updater.converge()

    assert "default" not in device.persisted()["tenants"]
    assert "default" not in device.persisted()["updates"]
    assert device.outcomes()[-1] == ("2", "rolled_back", "warning")
    [message] = [
        m for kind, _, m, attrs in device.events if kind == "update_outcome" and attrs["version"] == "2"
    ]
    assert message.endswith("rolled_back: tenant removed while on probation")
    assert device.pool.get("default") is None and device.pool.held("default") is None
    assert device.pool.loaded_bytes() == 0, "neither version stays loaded"
    assert device.persisted()["applied_generation"] == 3

    # Converging again reports nothing more: the update ended once.
    device.updater.converge()
    assert len([o for o in device.outcomes() if o[0] == "2"]) == 1


def test_removing_the_tenant_while_a_newer_version_is_fetched_reports_that_update_failed(
    tmp_path: Path,
) -> None:
    device = Device(tmp_path)
    device.want(1, "1")
    device.want(2, "3")  # version 3 never arrives: its update waits in fetch
    # What the updater persists when it asks for version 3's manifest (the link is down here).
    state = device.updater.state
    assert state.desired is not None
    [v3] = state.desired.assignments
    device.updater.states.save(state.with_update("default", Update(v3, "fetch", "")))
    device.pool = ModelPool(threads=1, clock=lambda: device.now)
    device.updater = device.start()
    assert device.update()[:2] == ("3", "fetch")
    assert device.updater.on_desired(fleet_pb2.DesiredState(device_id="dev-1", generation=3)) is None
    device.updater.converge()

    assert device.outcomes()[-1] == ("3", "failed", "warning")
    assert "default" not in device.persisted()["tenants"] and "default" not in device.persisted()["updates"]
    assert device.pool.get("default") is None
