"""A microphone-like tenant running silero-vad (its PyPI wheel's ONNX file) on a real agent is
sketched per band of its audio's spectrum, as its signature's NT input says, not per sample
position: the agent's sketches hold the controller's band features and an unchanged sound
shows no drift against a reference taken from the same kind of audio."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from controller import drift
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.media import write_wav
from tests.support.realmodels import VAD_CHUNK, VAD_CONTEXT, sample_inputs, silero_signature, speech_like
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

WINDOW = VAD_CHUNK + VAD_CONTEXT
FRAMES = 150


def frames_of(audio: np.ndarray) -> np.ndarray:
    count = (len(audio) - WINDOW) // VAD_CHUNK + 1
    return np.stack([audio[i * VAD_CHUNK : i * VAD_CHUNK + WINDOW] for i in range(count)])


def test_a_silero_tenant_is_sketched_per_band_and_unchanged_audio_shows_no_drift(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    reference, baseline = drift.reference_baseline(frames_of(speech_like(12.0, seed=5)), layout="nt")
    assert sorted(reference.features) == [f"f{i}" for i in range(drift.AUDIO_BANDS)]
    write_wav(tmp_path / "speech.wav", speech_like(6.0, seed=6))
    spec = fleet_pb2.DriftSpec(
        tenant="mic",
        model_name="silero",
        model_version="1",
        confidence_edges=list(reference.confidence_edges),
    )
    for name, edges in reference.features.items():
        spec.features.add(name=name, edges=list(edges))

    agent = make_agent(telemetry_interval_s=0.5)
    with agent.config.open("a") as f:
        f.write(
            '\n[[tenants]]\nid = "mic"\nmodel = "silero"\nqueue = 256\n'
            f'[tenants.source]\nkind = "wav"\nuri = "{tmp_path / "speech.wav"}"\nchunk = {VAD_CHUNK}\n'
            f"[tenants.preprocess]\nhop = {VAD_CHUNK}\n"
        )
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(real_models("silero_vad"))
    sample = tmp_path / "silero.npz"
    np.savez(sample, **sample_inputs("silero_vad", 2))
    assignment = peer.assignment(
        digest, "1", name="silero", tenant="mic", sample=sample, signature=silero_signature(WINDOW)
    )
    peer.publish_state(
        fleet_pb2.DesiredState(
            device_id=agent.device_id, generation=1, models=[assignment], drift_specs=[spec]
        )
    )
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest, tenant="mic", timeout=60)

    def sketched() -> list[fleet_pb2.DriftSketch] | None:
        with peer.lock:
            sketches = [s for t in peer.telemetry for s in t.drift if s.tenant == "mic"]
        return sketches if sum(s.samples for s in sketches) >= FRAMES else None

    sketches = wait_until(sketched, 90, f"sketches of {FRAMES} audio frames")
    names = [f"f{i}" for i in range(drift.AUDIO_BANDS)]
    assert {tuple(h.name for h in s.features) for s in sketches} == {tuple(names)}
    window = drift.Sketch(
        samples=sum(s.samples for s in sketches),
        features={
            name: tuple(int(c) for c in np.sum([list(s.features[i].counts) for s in sketches], axis=0))
            for i, name in enumerate(names)
        },
    )
    score = drift.score(baseline, window)
    print(
        f"silero tenant, {window.samples} frames of unchanged speech against its reference: PSI {score.psi:.3f}"
    )
    assert score.psi < drift.PSI_MODERATE, score
    assert "not sketched or captured" not in agent.output()
