"""A version whose sample inputs fail (not served, not fitting the model, refused by it) fails
on the device, but its model file is sound: it stays on disk (or its download stays, when it
was still arriving), so the generation that fixes the sample activates it without fetching a
single model chunk again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.model_bytes import linear_model, write_model
from tests.support.realmodels import sample_inputs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def failed(peer: Peer, digest: str, tenant: str = "default") -> fleet_pb2.ModelStatus | None:
    e = peer.entry(tenant, digest)
    return e if e is not None and e.phase == fleet_pb2.MODEL_PHASE_FAILED else None


def rows_signature(width: int) -> fleet_pb2.ModelSignature:
    signature = fleet_pb2.ModelSignature()
    signature.inputs.add(
        name="x", role="source", layout="NC", batch_axis=0, dtype="float32", shape=[-1, width]
    )
    return signature


def test_a_sample_that_does_not_fit_keeps_the_model_for_the_next_generation(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(2, 256, 64))
    peer.add_artifact(model)
    misfit, good = tmp_path / "misfit.npz", tmp_path / "good.npz"
    np.savez(misfit, x=np.zeros((2, 255), np.float32))
    np.savez(good, x=np.zeros((2, 256), np.float32))
    peer.publish_desired(1, peer.assignment(digest, "1", sample=misfit, signature=rows_signature(256)))
    agent.start()
    agent.wait_ready()
    status = wait_until(lambda: failed(peer, digest), 60, "staging with a misfit sample fails")
    assert "sample input 'x' has shape [1, 255], the model wants [-1, 256]" in status.error, status.error
    # The model is sound: the sample was wrong. It stays where a retry finds it.
    assert (agent.data_dir / "models" / f"{digest}.onnx").read_bytes() == model.read_bytes()

    mark = len(peer.requests)
    peer.publish_desired(2, peer.assignment(digest, "2", sample=good, signature=rows_signature(256)))
    peer.wait_active(digest, timeout=60)
    assert peer.requested_indices(digest, since=mark) == [], "the model was fetched again"
    assert not any(r.digest == digest and r.want_manifest for r in peer.requests[mark:])


def test_a_sample_the_controller_stops_serving_keeps_the_model_download(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    agent = make_agent()
    peer = make_peer(agent.device_id)
    model = tmp_path / "m.onnx"
    digest = write_model(model, linear_model(3, 512, 128))
    peer.add_artifact(model)
    assert -(-model.stat().st_size // peer.chunk_size) > 6
    gone = tmp_path / "gone.npz"
    np.savez(gone, x=np.zeros((1, 512), np.float32))
    broken = peer.assignment(digest, "1", sample=gone, signature=rows_signature(512))
    # The model arrives slowly and the sample not at all: 3 model chunks, then nothing.
    peer.digest_limits[digest], peer.digest_limits[broken.sample_digest] = 3, 0
    peer.publish_desired(1, broken)
    agent.start()
    agent.wait_ready()
    wait_until(lambda: len({i for d, i in peer.sent if d == digest}) == 3, 60, "3 model chunks on the device")
    received = {i for d, i in peer.sent if d == digest}
    # The controller no longer has the sample (deleted with its version, say): the next request
    # for it is answered "unknown digest", which fails the version.
    del peer.artifacts[broken.sample_digest]
    status = wait_until(lambda: failed(peer, digest), 60, "the assignment fails for its sample")
    assert status.error == (
        f"sample inputs {broken.sample_digest[:12]}: controller cannot serve the artifact: unknown digest"
    ), agent.output()[-3000:]

    mark = len(peer.requests)
    peer.digest_limits.clear()
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((1, 512), np.float32))
    peer.publish_desired(2, peer.assignment(digest, "2", sample=good, signature=rows_signature(512)))
    peer.wait_active(digest, timeout=60)
    again = set(peer.requested_indices(digest, since=mark))
    assert again and received.isdisjoint(again), (
        f"model chunks fetched again: {sorted(received & again)} of {sorted(again)}\n{agent.output()[-3000:]}"
    )
    assert (agent.data_dir / "models" / f"{digest}.onnx").read_bytes() == model.read_bytes()


def test_silero_refusing_made_up_inputs_is_kept_and_stages_with_the_samples_that_follow(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[..., Peer],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    model = real_models("silero_vad")
    agent = make_agent()
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1", name="silero"))
    agent.start()
    agent.wait_ready()
    status = wait_until(lambda: failed(peer, digest), 60, "silero fails staging on zeros")
    assert "Pad reflect requires axis length >= 2" in status.error, status.error
    assert (agent.data_dir / "models" / f"{digest}.onnx").is_file()

    mark = len(peer.requests)
    sample = tmp_path / "silero.npz"
    np.savez(sample, **sample_inputs("silero_vad", 2))
    peer.publish_desired(2, peer.assignment(digest, "2", name="silero", sample=sample))
    peer.wait_active(digest, timeout=60)
    assert peer.requested_indices(digest, since=mark) == [], "silero was fetched again"
