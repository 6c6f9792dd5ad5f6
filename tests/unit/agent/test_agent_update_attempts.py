"""Update attempts across crashes, and the wait for disk space, on real model files and state files.

A death of the agent while staging leaves the update persisted in ``stage`` (the
state is written before staging starts); each start that finds it so counts a
crash, and the update fails once it crashed the agent ``max_attempts`` times.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.topics import Kind

from agent.artifacts import ArtifactStore
from agent.conditions import DISK_FULL, Conditions
from agent.diskspace import FreeSpace
from agent.errors import DiskFull, ManifestError
from agent.pool import ModelPool
from agent.signing import KeyRing
from agent.state import StateStore, Update
from agent.update_machine import UpdateState, crash_reason, resume
from agent.updater import Updater
from tests.support.model_bytes import linear_model, write_model

S = UpdateState


class LinkDown:
    """The MQTT link while the broker is away: the planner publishes nothing."""

    connected = False

    def topic(self, kind: Kind) -> str:
        raise AssertionError("nothing is published while the link is down")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        raise AssertionError("nothing is published while the link is down")


class Device:
    """One device's data folder, started (``boot``) as often as a test likes."""

    def __init__(self, data_dir: Path, max_attempts: int = 3) -> None:
        self.data_dir = data_dir
        self.max_attempts = max_attempts
        self.events: list[tuple[str, str, str, dict[str, str]]] = []
        built = data_dir / "built"
        built.mkdir()
        self.files = {v: built / v for v in ("1", "2", "3")}
        self.digests = {v: write_model(p, linear_model(int(v), 4, 3)) for v, p in self.files.items()}
        self.updater = self.start()

    def start(self) -> Updater:
        """A new agent process on the same data folder: a fresh pool, the state from disk."""
        self.pool = ModelPool(threads=1)
        updater = Updater(
            "dev-1",
            StateStore(self.data_dir / "state.json"),
            ArtifactStore(self.data_dir),
            self.pool,
            LinkDown(),
            lambda *event: self.events.append(event),
            "test",
            keys=KeyRing(self.data_dir, None),
            max_attempts=self.max_attempts,
        )
        updater.boot()
        self.updater = updater
        return updater

    def want(self, generation: int, version: str, rollout_id: str = "", probation_s: float = 0.0) -> None:
        digest = self.digests[version]
        path = self.data_dir / "models" / f"{digest}.onnx"
        if not path.exists():
            shutil.copyfile(self.files[version], path)
            self.updater.installed.add(digest)
        m = fleet_pb2.ModelAssignment(
            tenant="default",
            model_name="linear",
            model_version=version,
            artifact_digest=digest,
            format="onnx",
            runtime="onnxruntime",
            rollout_id=rollout_id or f"r-{version}",
            probation_s=probation_s,
        )
        desired = fleet_pb2.DesiredState(device_id="dev-1", generation=generation, models=[m])
        assert self.updater.on_desired(desired) is None

    def die_while_staging(self, version: str) -> None:
        """What a death inside the runtime leaves: the update persisted in ``stage``, then nothing."""
        state = self.updater.state
        assert state.desired is not None
        [a] = [a for a in state.desired.assignments if a.model_version == version]
        before = state.updates.get("default")
        crashes = before.crashes if before is not None and before.assignment.digest == a.digest else 0
        self.updater.states.save(state.with_update("default", Update(a, S.STAGE.value, crashes=crashes)))

    def die_while_activating(self, version: str) -> None:
        """What a death while swapping models leaves: ``activate`` persisted, the old model still active."""
        state = self.updater.state
        assert state.desired is not None
        [a] = [a for a in state.desired.assignments if a.model_version == version]
        before = state.updates.get("default")
        assert before is not None and before.assignment.digest == a.digest
        self.updater.states.save(state.with_update("default", replace(before, state=S.ACTIVATE.value)))

    def persisted(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "state.json").read_text())
        return doc

    def update(self) -> tuple[str, str, str, int]:
        u = self.persisted()["updates"]["default"]
        return u["assignment"]["model_version"], u["state"], u["reason"], u["crashes"]

    def serving(self) -> str | None:
        serving = self.pool.get("default")
        return serving.model_version if serving is not None else None

    def outcomes(self) -> list[tuple[str, str, str]]:
        return [
            (attrs["version"], attrs["outcome"], message)
            for kind, _, message, attrs in self.events
            if kind == "update_outcome"
        ]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    d = Device(tmp_path)
    d.want(1, "1")
    d.updater.converge()
    assert d.update()[:2] == ("1", "committed")
    return d


def test_resume_fails_a_staging_update_only_once_it_crashed_the_agent_max_attempts_times() -> None:
    assert resume(S.STAGE, 1, 3) is S.STAGE
    assert resume(S.STAGE, 2, 3) is S.STAGE
    assert resume(S.STAGE, 3, 3) is S.FAILED
    assert resume(S.STAGE, 1, 1) is S.FAILED
    # Only staging loads the model; a death while fetching or verifying is not the model's doing.
    assert resume(S.FETCH, 9, 3) is S.FETCH
    assert resume(S.VERIFY, 9, 3) is S.VERIFY
    assert resume(S.PROBATION, 0, 3) is S.ROLLBACK
    assert crash_reason(3) == "crashed the agent 3 times while staging"
    assert crash_reason(1) == "crashed the agent 1 time while staging"


def test_an_update_that_keeps_killing_the_agent_while_staging_fails_after_max_attempts_and_v1_serves(
    device: Device,
) -> None:
    device.want(2, "2")
    for crashes in (1, 2):
        device.die_while_staging("2")
        device.start()
        # Counted and persisted at the start, before staging is tried again.
        assert device.update() == ("2", "stage", "", crashes)
        assert device.serving() == "1"
    device.die_while_staging("2")
    device.start()

    reason = "crashed the agent 3 times while staging"
    assert device.update() == ("2", "failed", reason, 3)
    assert device.persisted()["failures"][device.digests["2"]]["reason"] == reason
    assert device.outcomes()[-1] == ("2", "failed", f"linear 2: failed: {reason}")
    assert device.serving() == "1"
    assert device.persisted()["tenants"]["default"]["active"]["assignment"]["model_version"] == "1"

    # Nothing stages it again: not this start, not the next one.
    device.updater.converge()
    assert device.pool.held("default") is None
    assert device.pool.loaded_bytes() == device.files["1"].stat().st_size, "version 2 was never loaded"
    device.start()
    device.updater.converge()
    assert device.update() == ("2", "failed", reason, 3)
    assert device.serving() == "1"


def test_the_same_artifact_in_a_newer_generation_is_not_tried_again_a_newer_artifact_is(
    device: Device,
) -> None:
    device.want(2, "2")
    for _ in range(3):
        device.die_while_staging("2")
        device.start()
    assert device.update()[1:] == ("failed", "crashed the agent 3 times while staging", 3)
    outcomes = len(device.outcomes())

    # Another rollout assigns the same artifact: it fails at once, without a load.
    device.want(3, "2", rollout_id="r-again")
    device.updater.converge()
    assert device.serving() == "1"
    assert device.pool.loaded_bytes() == device.files["1"].stat().st_size
    failure = device.persisted()["failures"][device.digests["2"]]
    assert (failure["reason"], failure["generation"]) == ("crashed the agent 3 times while staging", 3)
    assert len(device.outcomes()) == outcomes, "the update ended once"

    # A newer artifact starts with no crashes counted, and serves.
    device.want(4, "3")
    device.updater.converge()
    assert device.serving() == "3"
    assert device.update()[:2] == ("3", "committed")
    assert device.update()[3] == 0


def test_a_staging_that_finishes_clears_the_crashes_counted_before(device: Device) -> None:
    device.want(2, "2")
    device.die_while_staging("2")
    device.start()
    assert device.update() == ("2", "stage", "", 1)
    device.updater.converge()
    assert device.serving() == "2"
    assert device.update() == ("2", "committed", "0 inferences, 0 errors", 0)


def test_max_attempts_one_fails_the_update_at_the_first_start_after_a_crash(tmp_path: Path) -> None:
    device = Device(tmp_path, max_attempts=1)
    device.want(1, "1")
    device.updater.converge()
    device.want(2, "2")
    device.die_while_staging("2")
    device.start()
    assert device.update() == ("2", "failed", "crashed the agent 1 time while staging", 1)
    assert device.serving() == "1"


def test_resume_rolls_back_a_crash_while_the_new_model_served_and_names_where_the_crashes_happened() -> None:
    assert resume(S.ACTIVATE, 1, 3) is S.ROLLBACK
    assert resume(S.PROBATION, 3, 3) is S.ROLLBACK
    assert resume(S.ROLLBACK, 3, 3) is S.ROLLBACK
    assert crash_reason(3, ("probation",)) == "crashed the agent 3 times while on probation"
    assert (
        crash_reason(3, ("stage", "activate", "probation"))
        == "crashed the agent 3 times while staging, activating or on probation"
    )
    assert (
        crash_reason(2, ("stage", "probation")) == "crashed the agent 2 times while staging or on probation"
    )


def test_an_update_that_kills_the_agent_on_probation_is_failed_for_good_after_max_attempts(
    device: Device,
) -> None:
    d2 = device.digests["2"]
    for generation, crashes in ((2, 1), (3, 2), (4, 3)):
        # Each rollout (a newer generation) of the same artifact is another attempt.
        device.want(generation, "2", rollout_id=f"r-{generation}", probation_s=600)
        device.updater.converge()
        assert device.update()[:2] == ("2", "probation")
        assert device.serving() == "2"
        device.start()  # the agent died while version 2 served on probation
        assert device.serving() == "1"
        assert device.update()[1] == "rolled_back"
        assert device.update()[3] == crashes
        if crashes < 3:
            assert device.update()[2] == f"the agent restarted during probation (attempt {crashes} of 3)"
    reason = "crashed the agent 3 times while on probation"
    assert device.update() == ("2", "rolled_back", reason, 3)
    assert device.persisted()["failures"][d2]["reason"] == f"rolled back: {reason}"
    assert device.outcomes()[-1] == ("2", "rolled_back", f"linear 2: rolled_back: {reason}")

    # Another rollout of the same artifact: refused at once, never loaded again.
    device.want(5, "2", rollout_id="r-5", probation_s=600)
    device.updater.converge()
    assert device.serving() == "1"
    assert device.pool.held("default") is None
    assert device.pool.loaded_bytes() == device.files["1"].stat().st_size, "version 2 was not loaded"
    failure = device.persisted()["failures"][d2]
    assert (failure["reason"], failure["generation"]) == (reason, 5)
    assert device.persisted()["tenants"]["default"]["active"]["assignment"]["model_version"] == "1"

    # A newer artifact starts afresh.
    device.want(6, "3")
    device.updater.converge()
    assert device.serving() == "3"
    assert device.update()[1:] == ("committed", "0 inferences, 0 errors", 0)


def test_crashes_while_staging_activating_and_on_probation_count_together(device: Device) -> None:
    device.want(2, "2", probation_s=600)
    device.die_while_staging("2")
    device.start()
    assert device.update() == ("2", "stage", "", 1)
    device.updater.converge()
    assert device.update()[:2] == ("2", "probation"), "staging finished: the crash is still counted"
    device.start()
    assert device.update()[1:] == ("rolled_back", "the agent restarted during probation (attempt 2 of 3)", 2)

    device.want(3, "2", rollout_id="r-3", probation_s=600)
    device.updater.converge()
    device.die_while_activating("2")
    device.start()
    reason = "crashed the agent 3 times while staging, activating or on probation"
    assert device.update() == ("2", "rolled_back", reason, 3)
    assert device.serving() == "1"


def test_a_commit_clears_the_crashes_counted_before(device: Device) -> None:
    device.want(2, "2", probation_s=600)
    device.updater.converge()
    device.start()
    assert device.update()[1:] == ("rolled_back", "the agent restarted during probation (attempt 1 of 3)", 1)
    device.want(3, "2", rollout_id="r-3")
    device.updater.converge()
    assert device.serving() == "2"
    assert device.update()[1:] == ("committed", "0 inferences, 0 errors", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_free_space_is_looked_at_with_backoff_until_what_waits_fits_with_the_reserve(tmp_path: Path) -> None:
    clock = Clock()
    free = {"bytes": 0}
    looked: list[float] = []

    def free_bytes(path: Path) -> int:
        looked.append(clock.now)
        return free["bytes"]

    conditions = Conditions(clock_ms=lambda: 42)
    space = FreeSpace(tmp_path, 1000, conditions, clock=clock, delay=lambda n: float(2**n), free=free_bytes)
    assert not space.full and space.poll(10**9), "nothing to wait for while the disk is not full"

    space.hit("writing chunk 3 of artifact abc: No space left on device")
    space.hit("writing chunk 4 of artifact abc: No space left on device")
    assert space.full
    [condition] = conditions.active()
    assert (condition.kind, condition.since_ms, condition.count) == (DISK_FULL, 42, 2)
    assert condition.message.endswith("chunk 4 of artifact abc: No space left on device")

    assert not space.poll(500) and looked == [], "not before the backoff"
    clock.now = space.next_poll
    free["bytes"] = 1499  # 500 wanted + 1000 kept free do not fit
    assert not space.poll(500)
    first_gap = space.next_poll - clock.now
    clock.now = space.next_poll
    assert not space.poll(500)
    assert space.next_poll - clock.now > first_gap, "the backoff grows"
    assert len(looked) == 2

    clock.now = space.next_poll
    free["bytes"] = 1500
    assert space.poll(500)
    assert not space.full and conditions.active() == ()

    # Full again at once (free space that writes still cannot use, as under a quota): the
    # backoff goes on growing instead of starting over, so the agent does not spin.
    polls = space.polls
    space.hit("writing state.json: Disk quota exceeded")
    assert space.polls == polls + 1
    clock.now = space.next_poll
    assert space.poll(500)
    clock.now += 61
    space.hit("writing state.json: No space left on device")
    assert space.polls == 1, "a disk full long after the last one starts the backoff afresh"


def manifest_of(path: Path, digest: str) -> artifact_pb2.ArtifactManifest:
    data = path.read_bytes()
    size = 1024
    hashes = [hashlib.sha256(data[i : i + size]).digest() for i in range(0, len(data), size)]
    return artifact_pb2.ArtifactManifest(
        digest=digest, size=len(data), chunk_size=size, chunk_sha256=hashes, format="onnx"
    )


def test_a_download_that_would_eat_into_the_reserve_waits_one_that_can_never_fit_is_refused(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(1, 64, 64))
    manifest = manifest_of(model, digest)
    usage = shutil.disk_usage(tmp_path)

    # The disk could hold it, but not now with the reserve kept free: transient, nothing left behind.
    store = ArtifactStore(tmp_path / "data", reserve_bytes=usage.total - manifest.size)
    with pytest.raises(DiskFull, match="bytes free"):
        store.start(digest, manifest)
    assert store.pending() == []

    store = ArtifactStore(tmp_path / "data", reserve_bytes=usage.total)
    with pytest.raises(ManifestError, match="can never fit"):
        store.start(digest, manifest)

    # With room, the whole size is taken from the disk up front.
    download = ArtifactStore(tmp_path / "data", reserve_bytes=0).start(digest, manifest)
    assert download.part.stat().st_blocks * 512 >= manifest.size
