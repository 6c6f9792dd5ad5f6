"""A real agent process trusts only desired states its pinned controller key signed for it.

Whoever can write the device's desired topic (here the controller's own broker account) cannot
move it: an unsigned state with the largest generation, one signed by another key, or one the
controller signed for another device is refused with an event, and the device keeps serving,
keeps its generation and obeys the next signed state, across restarts and after a signed
"remove everything"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto import fleet_pb2, inference_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind

from tests.support.agent_peer import Peer, sign_state
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

HUGE = 2**64 - 1
X = np.ones((1, 256), dtype=np.float32)


def served_version(agent: AgentProcess) -> str:
    req = inference_pb2.InferRequest()
    req.inputs["x"].CopyFrom(inference_pb2.Tensor(dtype="float32", shape=list(X.shape), data=X.tobytes()))
    resp: inference_pb2.InferResponse = agent.stub().Infer(req, timeout=10)
    return resp.model_version


def serve(peer: Peer, path: Path, seed: int) -> str:
    write_model(path, linear_model(seed, 256, 64))
    return peer.add_artifact(path)


def refusals(peer: Peer) -> list[str]:
    with peer.lock:
        return [
            e.message
            for e in peer.events
            if e.kind == "payload_rejected" and e.attributes.get("topic") == Kind.DESIRED.value
        ]


def refused(peer: Peer, count: int, text: str) -> str:
    """The ``count``-th refusal of a desired state, once it came; it must say ``text``."""
    wait_until(lambda: len(refusals(peer)) >= count, 30, f"refusal {count}")
    message = refusals(peer)[count - 1]
    assert text in message, refusals(peer)
    return message


def refusal_condition(peer: Peer) -> str:
    """The message of the desired_refused condition the device last reported, or ""."""
    last = peer.last_reported()
    held = [c.message for c in last.conditions if c.kind == "desired_refused"] if last is not None else []
    return held[0] if held else ""


def wait_applied(peer: Peer, generation: int) -> None:
    def applied() -> bool:
        last = peer.last_reported()
        return last is not None and last.applied_generation == generation

    wait_until(applied, 30, f"generation {generation} applied")


def generations_reported(peer: Peer) -> set[int]:
    with peer.lock:
        return {r.desired_generation for r in peer.reported} | {r.applied_generation for r in peer.reported}


def persisted_generations(agent: AgentProcess) -> str:
    return json.dumps(json.loads((agent.data_dir / "state.json").read_text()))


@pytest.mark.slow
def test_forged_desired_states_change_nothing_and_signed_ones_still_apply(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    first, second = (serve(peer, tmp_path / f"m{seed}.onnx", seed) for seed in (1, 2))
    peer.publish_desired(1, peer.assignment(first, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(first)
    wait_applied(peer, 1)

    # The attack of record: no signature, the largest generation, no assignments, retained on the
    # device's topic through the controller's broker account.
    peer.publish_raw(
        Kind.DESIRED, encode(fleet_pb2.DesiredState(device_id=agent.device_id, generation=HUGE)), True
    )
    reason = refused(peer, 1, "not signed by the controller")
    assert f"generation {HUGE}" in reason
    with peer.lock:  # the controller matches refusals to the generations it sent
        assert str(HUGE) in {
            e.attributes.get("generation") for e in peer.events if e.kind == "payload_rejected"
        }
    # Signed, but by a key the device does not pin; signed by the controller, but for another device.
    forger = Ed25519PrivateKey.generate()
    forged = sign_state(forger, fleet_pb2.DesiredState(device_id=agent.device_id, generation=HUGE))
    peer.publish_raw(Kind.DESIRED, encode(forged), True)
    refused(peer, 2, "signed by key")
    elsewhere = sign_state(peer.key, fleet_pb2.DesiredState(device_id="dev-elsewhere", generation=HUGE))
    peer.publish_raw(Kind.DESIRED, encode(elsewhere), True)
    refused(peer, 3, "is for device 'dev-elsewhere'")

    # Reported as a condition of the device, its generations and models left as they were.
    wait_until(lambda: "dev-elsewhere" in refusal_condition(peer), 30, "desired_refused condition")
    assert served_version(agent) == "1"
    assert str(HUGE) not in persisted_generations(agent)
    assert HUGE not in generations_reported(peer)
    last = peer.last_reported()
    assert last is not None and (last.desired_generation, last.applied_generation) == (1, 1)
    assert [(m.artifact_digest, m.phase) for m in last.models] == [(first, fleet_pb2.MODEL_PHASE_ACTIVE)]

    # The next signed state applies.
    peer.publish_desired(2, peer.assignment(second, "2"))
    peer.wait_active(second)
    assert served_version(agent) == "2"
    wait_until(lambda: refusal_condition(peer) == "", 30, "condition cleared by a verified state")

    # A signed "remove everything" is obeyed, and so is the signed state after it.
    peer.publish_desired(3)
    wait_until(
        lambda: (r := peer.last_reported()) is not None and r.applied_generation == 3 and not r.models,
        30,
        "every tenant removed",
    )
    peer.publish_desired(4, peer.assignment(first, "1"))
    peer.wait_active(first)
    assert served_version(agent) == "1"

    # A restart meets the forged state retained on the topic, and still obeys the next signed one.
    agent.terminate()
    peer.publish_raw(
        Kind.DESIRED, encode(fleet_pb2.DesiredState(device_id=agent.device_id, generation=HUGE)), True
    )
    agent.start()
    agent.wait_ready()
    refused(peer, 4, "not signed by the controller")
    assert served_version(agent) == "1"
    peer.publish_desired(5, peer.assignment(second, "2"))
    peer.wait_active(second)
    wait_applied(peer, 5)
    assert served_version(agent) == "2"
    assert HUGE not in generations_reported(peer)
    assert "desired ignored" not in agent.output()


def test_a_replayed_older_signed_state_changes_nothing(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    first, second = (serve(peer, tmp_path / f"m{seed}.onnx", seed) for seed in (1, 2))
    old = sign_state(
        peer.key,
        fleet_pb2.DesiredState(device_id=agent.device_id, generation=1, models=[peer.assignment(first, "1")]),
    )
    peer.publish_state(old)
    agent.start()
    agent.wait_ready()
    peer.wait_active(first)
    peer.publish_desired(2, peer.assignment(second, "2"))
    peer.wait_active(second)
    wait_applied(peer, 2)

    # Whoever recorded generation 1 replays it, signature and all.
    peer.publish_raw(Kind.DESIRED, encode(old), True)
    wait_until(
        lambda: "desired ignored" in agent.output() and "generation=1 " in agent.output(),
        30,
        "replay ignored",
    )
    assert served_version(agent) == "2"
    last = peer.last_reported()
    assert last is not None and (last.desired_generation, last.applied_generation) == (2, 2)
