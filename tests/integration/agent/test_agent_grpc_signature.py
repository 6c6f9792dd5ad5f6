"""gRPC Infer on a stateful, multi-input real model (silero-vad from its PyPI wheel): a caller
that sends only the audio gets the sample rate and the initial RNN state from the version's
signature, as a tenant pipeline does; a caller that carries the state itself (stateN of one
answer sent back as state) runs the stream, matching onnxruntime run directly.

State is not kept between calls: a call names no stream, so the agent cannot tell one
caller's next window from another's; each call without a state starts from the initial one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import inference_pb2

from agent.tensors import from_arrays, to_numpy
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.realmodels import sample_inputs, silero_signature, speech_like, vad_chunks

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

RATE = 16000


def test_a_call_with_only_the_audio_gets_its_constant_and_initial_state_from_the_signature(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    model = real_models("silero_vad")
    frames = vad_chunks(speech_like(0.5))[:4]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sr, state = np.array(RATE, np.int64), np.zeros((2, 1, 128), np.float32)
    direct = []
    for frame in frames:
        out, state = session.run(None, {"input": frame[None], "state": state, "sr": sr})
        direct.append((out, state))
    sample = tmp_path / "silero.npz"
    np.savez(sample, **sample_inputs("silero_vad", 2))

    agent = make_agent()
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(model)
    peer.publish_desired(
        1, peer.assignment(digest, "1", name="silero", sample=sample, signature=silero_signature())
    )
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest, timeout=60)
    stub = agent.stub()

    def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        response = stub.Infer(inference_pb2.InferRequest(inputs=from_arrays(inputs)), timeout=10)
        return {name: to_numpy(t) for name, t in response.outputs.items()}

    # Only the audio: the sample rate and the zero state come from the signature.
    first = infer({"input": frames[0][None]})
    assert set(first) == {"output", "stateN"}
    worst = float(np.abs(first["output"] - direct[0][0]).max())
    # The caller carries the state: each answer's stateN is the next call's state.
    carried = first["stateN"]
    for frame, (want, want_state) in zip(frames[1:], direct[1:], strict=True):
        got = infer({"input": frame[None], "state": carried})
        worst = max(
            worst, float(np.abs(got["output"] - want).max()), float(np.abs(got["stateN"] - want_state).max())
        )
        carried = got["stateN"]
    print(f"gRPC with the signature's inputs vs onnxruntime direct, state carried by the caller: {worst:.2e}")
    assert worst < 1e-5
    # A call without a state starts afresh: the agent keeps no stream between calls.
    again = infer({"input": frames[3][None]})
    fresh, _ = session.run(
        None, {"input": frames[3][None], "state": np.zeros((2, 1, 128), np.float32), "sr": sr}
    )
    assert float(np.abs(again["output"] - fresh).max()) < 1e-5
    # Two streams in one call: the initial state is made as wide as the batch.
    both = infer({"input": frames[:2]})
    assert both["output"].shape == (2, 1) and both["stateN"].shape == (2, 2, 128)
