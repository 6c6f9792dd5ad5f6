"""Signed assignments through the real agent process, with a protocol peer as the controller:
tampered, unsigned and wrongly signed artifacts are refused before download and the previous
model keeps serving; a key rotation signed by the pinned key is followed, a forged one is not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import fleet_pb2
from edgefleet_proto.signing import key_id, manifest_bytes, rotation_bytes

from tests.support.agent_calls import infer
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

X = np.ones((1, 256), dtype=np.float32)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, m: fleet_pb2.ModelAssignment) -> fleet_pb2.ModelAssignment:
    m.variant = "onnx-fp32"
    m.key_id = key_id(raw(key))
    m.signature = key.sign(
        manifest_bytes(m.model_name, m.model_version, m.variant, m.artifact_digest, m.artifact_size)
    )
    return m


def failed_with(peer: Peer, digest: str) -> str:
    def failed() -> fleet_pb2.ModelStatus | None:
        e = peer.entry("default", digest)
        return e if e is not None and e.phase == fleet_pb2.MODEL_PHASE_FAILED else None

    return wait_until(failed, 30, f"FAILED entry for {digest[:12]}").error


def test_only_what_the_pinned_key_signed_is_installed(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    controller, forger, successor = (Ed25519PrivateKey.generate() for _ in range(3))
    agent = make_agent(controller_key=raw(controller).hex())
    peer = make_peer(agent.device_id, key=controller)
    digests = []
    for seed in (1, 2, 3):
        path = tmp_path / f"m{seed}.onnx"
        digests.append(write_model(path, linear_model(seed, 256, 64)))
        peer.add_artifact(path)
    first, second, third = digests
    peer.publish_desired(1, sign(controller, peer.assignment(first, "1")))
    agent.start()
    agent.wait_ready()
    peer.wait_active(first)

    # Tampered: v1's valid signature on an assignment pointing at another artifact.
    tampered = peer.assignment(second, "1")
    tampered.variant, tampered.key_id = "onnx-fp32", key_id(raw(controller))
    tampered.signature = sign(controller, peer.assignment(first, "1")).signature
    peer.publish_desired(2, tampered)
    assert "does not match the manifest" in failed_with(peer, second)
    peer.publish_desired(3, peer.assignment(second, "2", signed=False))
    wait_until(
        lambda: "not signed" in (peer.entry("default", second) or fleet_pb2.ModelStatus()).error,
        30,
        "unsigned refused",
    )
    peer.publish_desired(4, sign(forger, peer.assignment(second, "2")))
    wait_until(
        lambda: "signed by key" in (peer.entry("default", second) or fleet_pb2.ModelStatus()).error,
        30,
        "forged refused",
    )
    assert peer.requested_indices(second) == []  # refused before any download
    assert infer(agent, X).model_version == "1"
    assert "artifact_refused" in peer.event_kinds()

    # A rotation vouched for by a key the device does not pin changes nothing.
    forged = sign(successor, peer.assignment(second, "2"))
    forged.key_rotation.CopyFrom(
        fleet_pb2.KeyRotation(
            new_public_key=raw(successor), signature=forger.sign(rotation_bytes(raw(successor)))
        )
    )
    peer.publish_desired(5, forged)

    def forged_refused() -> bool:
        last = peer.last_reported()
        entry = peer.entry("default", second)
        seen = last is not None and last.desired_generation == 5
        return seen and entry is not None and "this device trusts controller key" in entry.error

    wait_until(forged_refused, 30, "forged rotation refused")
    assert not (agent.data_dir / "controller_key.json").exists()

    # The real rotation: signed by the pinned key, carried by the first assignment the new key signed
    # and followed before the state, which the new key signed, is checked.
    peer.key = successor
    rotated = sign(successor, peer.assignment(second, "2"))
    rotated.key_rotation.CopyFrom(
        fleet_pb2.KeyRotation(
            new_public_key=raw(successor), signature=controller.sign(rotation_bytes(raw(successor)))
        )
    )
    peer.publish_desired(6, rotated)
    peer.wait_active(second)
    assert infer(agent, X).model_version == "2"
    # After a restart the device still trusts the new key only: a state it signed is taken, an
    # assignment the old key signed is not.
    agent.terminate()
    peer.publish_desired(7, sign(controller, peer.assignment(third, "3")))
    agent.start()
    agent.wait_ready()
    assert "signed by key" in failed_with(peer, third)
    assert infer(agent, X).model_version == "2"
