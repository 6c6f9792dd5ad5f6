"""Shadow comparison of gRPC Infer calls on a real agent.

Two tenants served only through gRPC, both on the same live digits classifier:
one has a shadow candidate that mostly agrees (trained for fewer iterations), the
other one trained on labels shifted by one (confident and wrong). The callers get
exactly the live model's answers; the telemetry's shadow stats match the top-1
agreement computed here with onnxruntime on the same inputs, row by row: calls
carry batches of different sizes and every row counts as one comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2

from agent.tensors import from_arrays, to_numpy
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.models import digits_classifier, signature_of
from tests.support.waiting import wait_until

# The agreeing candidate is an under-trained classifier on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:lbfgs failed to converge")

ROUNDS, CALLS = 4, 8  # CALLS per round stays within the shadow queue: nothing is dropped
SIZES = [1 + c for c in range(CALLS)]  # rows per call, the same in every round


def shifted_digits(path: Path) -> Path:
    """Logistic regression on the digits with every label shifted by one, as ONNX."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=300).fit(x[:1500], (y[:1500] + 1) % 10)
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return path


def shadow_stats(peer: Peer, tenant: str) -> list[fleet_pb2.ShadowStats]:
    with peer.lock:
        windows = list(peer.telemetry)
    return [s for t in windows for s in t.shadows if s.tenant == tenant and s.compared]


def test_infer_calls_are_compared_with_the_shadow_and_reach_telemetry(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    live = digits_classifier(tmp_path / "live.onnx")
    models = {
        "agree": live.path,
        "agree.shadow": digits_classifier(tmp_path / "short.onnx", max_iter=15).path,
        "disagree": live.path,
        "disagree.shadow": shifted_digits(tmp_path / "shifted.onnx"),
    }
    agent = make_agent(telemetry_interval_s=0.2)
    peer = make_peer(agent.device_id)
    assignments = [
        peer.assignment(
            peer.add_artifact(path),
            "2" if t.endswith(".shadow") else "1",
            name="digits",
            tenant=t,
            signature=signature_of(path),  # as the controller sends it: its scores are the probabilities
        )
        for t, path in models.items()
    ]
    peer.publish_desired(1, *assignments)
    agent.start()
    agent.wait_ready()
    for a in assignments:
        peer.wait_active(a.artifact_digest, tenant=a.tenant)

    sessions = {t: ort.InferenceSession(str(p)) for t, p in models.items()}
    stub = agent.stub()
    rows = live.samples[: ROUNDS * sum(SIZES)]
    assert len(rows) == ROUNDS * sum(SIZES)
    # One entry per row: did the candidate's top-1 match the live model's?
    agreement: dict[str, list[bool]] = {"agree": [], "disagree": []}
    for r in range(ROUNDS):
        for tenant in agreement:
            for c in range(CALLS):
                start = r * sum(SIZES) + sum(SIZES[:c])
                x = rows[start : start + SIZES[c]]
                req = inference_pb2.InferRequest(tenant=tenant, inputs=from_arrays({"X": x}))
                response = stub.Infer(req, timeout=10)
                label, probabilities = sessions[tenant].run(None, {"X": x})
                # The caller gets the live model's answer, nothing of the candidate's.
                assert (response.model_name, response.model_version) == ("digits", "1")
                np.testing.assert_array_equal(to_numpy(response.outputs["label"]), label)
                np.testing.assert_allclose(
                    to_numpy(response.outputs["probabilities"]), probabilities, rtol=1e-5
                )
                shadow_label = sessions[f"{tenant}.shadow"].run(None, {"X": x})[0]
                agreement[tenant].extend((label == shadow_label).tolist())
        # Comparisons run after the answers, on the scheduler: await them before the next round,
        # so the shadow queue never holds more than one round (its bound) and nothing drops.
        for tenant, seen in agreement.items():
            wait_until(
                lambda t=tenant, seen=seen: sum(s.compared for s in shadow_stats(peer, t)) == len(seen),
                30,
                f"{tenant}: {len(seen)} rows compared in telemetry",
            )

    for tenant, seen in agreement.items():
        stats = shadow_stats(peer, tenant)
        assert {(s.live_model_version, s.candidate_model_name, s.candidate_model_version) for s in stats} == {
            ("1", "digits", "2")
        }
        compared = sum(s.compared for s in stats)
        got = sum(s.top1_agreement * s.compared for s in stats) / compared
        assert compared == ROUNDS * sum(SIZES)
        assert got == pytest.approx(float(np.mean(seen)), abs=1e-9)
    assert 0.8 < np.mean(agreement["agree"]) < 1.0, "the under-trained candidate mostly agrees"
    assert np.mean(agreement["disagree"]) < 0.2, "the candidate on shifted labels disagrees"
    with peer.lock:
        lanes = [s for t in peer.telemetry for s in t.tenants if s.tenant.endswith(".shadow")]
    assert sum(s.dropped for s in lanes) == 0 and sum(s.errors for s in lanes) == 0
