"""Artifact transfer through the real agent: resume, corrupt chunks, lying digests, bad payloads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from edgefleet_proto import fleet_pb2
from edgefleet_proto.topics import Kind

from tests.support.agent_calls import infer, output
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.waiting import wait_until

X = np.ones((1, 256), dtype=np.float32)


def test_kill_9_mid_download_resumes_without_refetching(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(2, 256, 64))
    peer.add_artifact(model)
    peer.serve_limit = 6
    peer.publish_desired(1, peer.assignment(digest, "1"))
    agent.start()
    agent.wait_ready()

    def stalled() -> bool:
        entry = peer.entry("default", digest)
        return entry is not None and entry.bytes_have == 6 * peer.chunk_size

    wait_until(stalled, 30, "6 chunks on the device")
    received = {i for d, i in peer.sent if d == digest}
    assert len(received) == 6
    agent.kill()

    mark = len(peer.requests)
    peer.serve_limit = None
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest)
    again = peer.requested_indices(digest, since=mark)
    assert again, "the agent asked for the rest"
    assert received.isdisjoint(again), f"re-requested chunks already on disk: {received & set(again)}"
    assert not any(r.want_manifest for r in peer.requests[mark:]), "the manifest was on disk"
    assert "download resumed" in agent.output()
    assert output(infer(agent, X)).shape == (1, 64)


def test_corrupt_chunk_is_rejected_and_fetched_again(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(3, 256, 64))
    peer.add_artifact(model)
    peer.corrupt_once.add((digest, 2))
    peer.publish_desired(1, peer.assignment(digest, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest)
    assert peer.requested_indices(digest).count(2) == 2
    wait_until(lambda: "chunk_rejected" in peer.event_kinds(), 10, "chunk_rejected event")
    rejected = next(e for e in peer.events if e.kind == "chunk_rejected")
    assert (rejected.attributes["index"], rejected.attributes["digest"]) == ("2", digest)
    assert output(infer(agent, X)).shape == (1, 64)


def test_chunks_are_asked_for_in_batches_and_one_lost_is_asked_for_again_after_its_timeout(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(7, 256, 64))
    peer.add_artifact(model)
    chunks = len(peer.artifacts[digest].manifest.chunk_sha256)
    peer.drop_once.add((digest, 1))
    peer.publish_desired(1, peer.assignment(digest, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest)
    with peer.lock:
        batches = [list(r.indices) for r in peer.requests if r.digest == digest and r.indices]
    assert sum(b.count(1) for b in batches) == 2, batches
    assert sorted(i for b in batches for i in b) == sorted([*range(chunks), 1]), batches
    # A window of 4 asks again once 2 slots are free: 2 or more chunks a request, but for
    # the last chunk (asked for as soon as it fits) and the lost one after its timeout.
    assert all(len(b) >= 2 or b in ([chunks - 1], [1]) for b in batches), batches
    assert output(infer(agent, X)).shape == (1, 64)


def test_digest_mismatch_is_refused_and_previous_model_keeps_serving(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    good, other = tmp_path / "good.onnx", tmp_path / "other.onnx"
    good_digest = write_model(good, linear_model(4, 256, 64))
    write_model(other, linear_model(5, 256, 64))
    peer.add_artifact(good)
    peer.publish_desired(1, peer.assignment(good_digest, "1"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(good_digest)
    before = output(infer(agent, X))

    # Every chunk matches the manifest, but the file is not what the digest names.
    liar = hashlib.sha256(b"not the artifact").hexdigest()
    peer.add_artifact(other, claim_digest=liar)
    peer.publish_desired(2, peer.assignment(liar, "2"))

    def failed() -> fleet_pb2.ModelStatus | None:
        e = peer.entry("default", liar)
        return e if e is not None and e.phase == fleet_pb2.MODEL_PHASE_FAILED else None

    entry = wait_until(failed, 30, "FAILED entry for the lying digest")
    assert "sha256" in entry.error
    reported = peer.last_reported()
    assert reported is not None
    active = [m for m in reported.models if m.phase == fleet_pb2.MODEL_PHASE_ACTIVE]
    assert [(m.artifact_digest, m.model_version) for m in active] == [(good_digest, "1")]
    assert reported.applied_generation == 1 and reported.desired_generation == 2
    resp = infer(agent, X)
    assert resp.model_version == "1"
    np.testing.assert_array_equal(output(resp), before)
    wait_until(lambda: "model_failed" in peer.event_kinds(), 10, "model_failed event")
    assert not list((agent.data_dir / "models").glob(f"{liar}*"))


def test_malformed_payloads_are_logged_and_the_agent_keeps_working(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: any(s.online for s in peer.statuses), 10, "online")
    truncated = b"\x0a\xff"  # field 1, length 255, then nothing
    peer.publish_raw(Kind.DESIRED, truncated)
    peer.publish_raw(Kind.ARTIFACT_RESPONSE, truncated)
    peer.publish_raw(Kind.ARTIFACT_RESPONSE, b"\x12\x03\xff\xff\xff")
    wait_until(lambda: peer.event_kinds().count("payload_rejected") >= 3, 10, "payload_rejected events")
    assert agent.output().count("payload rejected") >= 3

    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(6, 256, 64))
    peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1"))
    peer.wait_active(digest)
    assert output(infer(agent, X)).shape == (1, 64)
    assert agent.proc is not None and agent.proc.poll() is None
