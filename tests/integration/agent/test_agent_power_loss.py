"""Power loss during each write of the agent, as a table: every file the agent replaces
atomically (its state, the tenants the controller declared, the rotated controller key, an
artifact's manifest, a finished model moved into place) and every step of that write.

The agent serves version 1 and is restarted with the crash point armed; generation 2 (a new
model, a key rotation and a changed tenant) makes it write each of those files, and it is
SIGKILLed at the chosen step of the first matching write. Afterwards the file must be the old
version up to the rename and the new one from it on, never anything else; the restarted agent
serves a working model at once and converges on generation 2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import artifact_pb2, fleet_pb2, inference_pb2
from edgefleet_proto.signing import rotation_bytes

from agent.atomic import CRASH_AT_ENV, WRITE_STEPS
from tests.support.agent_peer import Peer, public_key
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

X = np.ones((1, 256), dtype=np.float32)
BEFORE_RENAME = {"partial", "written", "synced"}


def tenant_spec(rate_hz: float) -> fleet_pb2.TenantSpec:
    # A declared tenant whose model is never assigned: its samples are skipped, and a new rate
    # is a new declaration the agent persists.
    return fleet_pb2.TenantSpec(
        tenant="yard",
        model_name="unassigned",
        source=fleet_pb2.SourceSpec(kind="synthetic", options={"shape": "8"}),
        target_rate_hz=rate_hz,
    )


def model_version(agent: AgentProcess) -> str:
    req = inference_pb2.InferRequest()
    req.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(X.shape), data=X.tobytes()))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return str(resp.model_version)


def is_state(data: bytes, generation: int) -> bool:
    return int(json.loads(data)["desired"]["generation"]) == generation


def is_tenants(data: bytes, generation: int) -> bool:
    return fleet_pb2.DesiredState.FromString(data).generation == generation


class Scenario:
    def __init__(self, agent: AgentProcess, peer: Peer, d1: str, d2: str, successor: Ed25519PrivateKey):
        self.agent, self.peer, self.d1, self.d2, self.successor = agent, peer, d1, d2, successor

    def path(self, name: str) -> Path:
        data = self.agent.data_dir
        return {
            "state.json": data / "state.json",
            "tenants.pb": data / "tenants.pb",
            "controller_key.json": data / "controller_key.json",
            "manifest.pb": data / "downloads" / self.d2 / "manifest.pb",
            "model": data / "models" / f"{self.d2}.onnx",
        }[name]

    def is_new(self, name: str, data: bytes) -> bool:
        if name == "state.json":
            return is_state(data, 2)
        if name == "tenants.pb":
            return is_tenants(data, 2)
        if name == "controller_key.json":
            return bool(json.loads(data)["public_key"] == public_key(self.successor).hex())
        if name == "manifest.pb":
            return (
                artifact_pb2.ArtifactManifest.FromString(data).size
                == self.peer.artifacts[self.d2].manifest.size
            )
        return hashlib.sha256(data).hexdigest() == self.d2


# (file, step): every step of write_atomic for the files it writes, the rename steps of the
# finished model's move.
CASES = [(name, step) for name in ("state.json", "tenants.pb", "controller_key.json", "manifest.pb")
         for step in WRITE_STEPS] + [("model", "renamed"), ("model", "dir_synced")]  # fmt: skip


def read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


@pytest.mark.slow
@pytest.mark.parametrize(("name", "step"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_power_loss_at_each_step_of_each_write_leaves_old_or_new_and_converges(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    controller_key: Ed25519PrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    step: str,
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    m1, m2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    d1, d2 = write_model(m1, linear_model(61, 256, 64)), write_model(m2, linear_model(62, 256, 64))
    peer.add_artifact(m1)
    peer.add_artifact(m2)
    peer.publish_state(
        fleet_pb2.DesiredState(
            device_id=agent.device_id,
            generation=1,
            models=[peer.assignment(d1, "1")],
            tenants=[tenant_spec(1)],
        )
    )
    agent.start()
    agent.wait_ready()
    peer.wait_active(d1)
    wait_until(lambda: (agent.data_dir / "tenants.pb").exists(), 20, "tenants declared")
    agent.terminate()
    successor = Ed25519PrivateKey.generate()
    scenario = Scenario(agent, peer, d1, d2, successor)
    path = scenario.path(name)
    old = read(path)

    monkeypatch.setenv(CRASH_AT_ENV, f"{path.name}:{step}")
    agent.start()
    agent.wait_ready()
    monkeypatch.delenv(CRASH_AT_ENV)
    assert agent.proc is not None and agent.proc.poll() is None, "killed before generation 2 was sent"
    # Generation 2: the controller rotated its key (the new key signs the state and the
    # assignment; the old one signs the rotation), a new model, a new tenant rate.
    peer.key = successor
    v2 = peer.assignment(d2, "2")
    v2.key_rotation.CopyFrom(
        fleet_pb2.KeyRotation(
            new_public_key=public_key(successor),
            signature=controller_key.sign(rotation_bytes(public_key(successor))),
        )
    )
    peer.publish_state(
        fleet_pb2.DesiredState(device_id=agent.device_id, generation=2, models=[v2], tenants=[tenant_spec(2)])
    )
    agent.proc.wait(30)
    assert agent.proc.returncode == -9, agent.output()[-3000:]

    now = read(path)
    leftovers = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    if step in BEFORE_RENAME:
        assert now == old, f"{path.name} changed before its rename"
        assert leftovers, "the write was cut before its temporary file was renamed"
        if step != "partial":
            assert scenario.is_new(name, leftovers[0].read_bytes())
    else:
        assert now is not None and now != old and scenario.is_new(name, now), (
            f"{path.name} is not the new one"
        )

    agent.start()
    agent.wait_ready()
    assert model_version(agent) in ("1", "2"), "a working model serves as soon as the agent is up"
    peer.wait_active(d2)
    state = agent.data_dir / "state.json"
    wait_until(
        lambda: json.loads(state.read_bytes()).get("applied_generation") == 2, 30, "generation 2 applied"
    )
    assert model_version(agent) == "2"
    wait_until(
        lambda: is_tenants((agent.data_dir / "tenants.pb").read_bytes(), 2), 20, "tenants of generation 2"
    )
    key = json.loads((agent.data_dir / "controller_key.json").read_bytes())
    assert key["public_key"] == public_key(successor).hex()
