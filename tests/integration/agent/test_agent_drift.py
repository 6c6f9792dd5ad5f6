"""The agent's own drift sketches and data capture, on a real agent over the real broker.

The protocol peer plays the controller: a desired state with the digits model
for a CSV replay tenant and for a gRPC-only tenant, each with its drift spec,
and a capture policy for the replay tenant. What comes back: the telemetry's
sketches add up to what the controller's drift math makes of the same rows and
the model's own probabilities, and the capture chunks reassemble into a data
set of replayed rows.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from edgefleet_proto import fleet_pb2, inference_pb2
from edgefleet_proto.topics import Kind

from agent.drift_sketch import build_sketch
from agent.tensors import from_arrays
from controller import drift
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.models import digits_classifier, scores_beside_features, signature_of
from tests.support.waiting import wait_until

ROWS = 30


def spec_for(
    tenant: str, reference: np.ndarray, name: str = "digits", classes: int = 10
) -> fleet_pb2.DriftSpec:
    edges, _ = drift.reference_baseline(reference, None)
    spec = fleet_pb2.DriftSpec(
        tenant=tenant,
        model_name=name,
        model_version="1",
        confidence_edges=list(edges.confidence_edges),
        num_classes=classes,
    )
    for name, e in edges.features.items():
        spec.features.add(name=name, edges=list(e))
    return spec


def totals(peer: Peer, tenant: str) -> fleet_pb2.DriftSketch | None:
    """Every window's sketch of the tenant added up (the controller sums windows the same way)."""
    with peer.lock:
        sketches = [s for t in peer.telemetry for s in t.drift if s.tenant == tenant]
    if not sketches:
        return None
    out = fleet_pb2.DriftSketch()
    out.CopyFrom(sketches[0])
    for s in sketches[1:]:
        out.samples += s.samples
        for mine, theirs in zip(out.features, s.features, strict=True):
            mine.counts[:] = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
        out.class_counts[:] = [a + b for a, b in zip(out.class_counts, s.class_counts, strict=True)]
        out.confidence.counts[:] = [
            a + b for a, b in zip(out.confidence.counts, s.confidence.counts, strict=True)
        ]
    return out


def scaled(sketch: fleet_pb2.DriftSketch, k: int) -> dict[str, Any]:
    return {
        "samples": sketch.samples * k,
        "features": {h.name: [c * k for c in h.counts] for h in sketch.features},
        "classes": [c * k for c in sketch.class_counts],
        "confidence": [c * k for c in sketch.confidence.counts],
    }


def plain(sketch: fleet_pb2.DriftSketch) -> dict[str, Any]:
    return scaled(sketch, 1)


def test_replayed_and_called_inferences_are_sketched_and_captured(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    rows = digits.samples[:ROWS].astype(np.float32)
    csv = tmp_path / "readings.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%g")
    agent = make_agent(telemetry_interval_s=0.5)
    with agent.config.open("a") as f:
        f.write(
            f'\n[[tenants]]\nid = "replay"\nmodel = "digits"\nqueue = 64\n'
            f'[tenants.source]\nkind = "csv"\nuri = "{csv}"\n'
        )
    peer = make_peer(agent.device_id)
    chunks: list[fleet_pb2.CaptureChunk] = []
    got_chunk = threading.Lock()
    capture_topic = peer.topic(Kind.CAPTURE)

    def on_capture(client: Any, userdata: Any, msg: Any) -> None:
        with got_chunk:
            chunks.append(fleet_pb2.CaptureChunk.FromString(msg.payload))

    peer.client.message_callback_add(capture_topic, on_capture)
    peer.client.subscribe(capture_topic, qos=1)

    digest = peer.add_artifact(digits.path)
    reference = digits.samples[ROWS:].astype(np.float64)
    specs = {t: spec_for(t, reference) for t in ("replay", "app")}
    policy = fleet_pb2.CapturePolicy(
        tenant="replay",
        model_name="digits",
        policy_id="p-7",
        random_fraction=1.0,
        max_samples_per_upload=ROWS,
    )
    desired = fleet_pb2.DesiredState(
        device_id=agent.device_id,
        generation=1,
        models=[
            peer.assignment(digest, "1", name="digits", tenant=t, signature=signature_of(digits.path))
            for t in ("replay", "app")
        ],
        drift_specs=specs.values(),
        capture_policies=[policy],
    )
    peer.publish_state(desired)
    agent.start()
    agent.wait_ready()
    for tenant in ("replay", "app"):
        peer.wait_active(digest, tenant=tenant)

    session = ort.InferenceSession(str(digits.path))
    _, probs = session.run(None, {"X": rows})
    one_pass = build_sketch(specs["replay"], rows, probs)

    # The replay tenant: its CSV ends and is replayed after a backoff, so whole passes add up.
    def whole_passes() -> int | None:
        got = totals(peer, "replay")
        if got is None or got.samples == 0 or got.samples % ROWS:
            return None
        k = got.samples // ROWS
        return k if plain(got) == scaled(one_pass, k) else None

    wait_until(whole_passes, 60, "sketches of whole replay passes in telemetry")

    # The gRPC tenant: each Infer call is sketched too.
    stub = agent.stub()
    for _ in range(3):
        stub.Infer(inference_pb2.InferRequest(tenant="app", inputs=from_arrays({"X": rows})), timeout=10)
    called = build_sketch(specs["app"], rows, probs)
    wait_until(
        lambda: (s := totals(peer, "app")) and plain(s) == scaled(called, 3), 30, "the calls' sketches"
    )

    # Capture: every sample (random_fraction 1) in uploads of ROWS rows, through the outbox.
    def first_upload() -> list[fleet_pb2.CaptureChunk] | None:
        with got_chunk:
            if not chunks:
                return None
            upload = [c for c in chunks if c.upload_id == chunks[0].upload_id]
        return upload if len(upload) == upload[0].count else None

    upload = sorted(wait_until(first_upload, 30, "a whole capture upload"), key=lambda c: c.index)
    data = b"".join(c.data for c in upload)
    head = upload[0]
    assert hashlib.sha256(data).hexdigest() == head.sha256 and len(data) == head.size
    assert (head.tenant, head.model_name, head.model_version, head.policy_id) == (
        "replay",
        "digits",
        "1",
        "p-7",
    )
    assert head.samples == ROWS and dict(head.reasons) == {"random": ROWS}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        inputs, captured_probs, codes = npz["inputs"], npz["probabilities"], npz["reason_codes"]
    known = {r.tobytes(): i for i, r in enumerate(rows)}
    assert inputs.shape == (ROWS, 64) and all(r.tobytes() in known for r in inputs)
    expected = probs[[known[r.tobytes()] for r in inputs]]
    np.testing.assert_allclose(captured_probs, expected, rtol=1e-5, atol=1e-6)
    assert set(codes.tolist()) == {0}
    assert "not sketched or captured" not in agent.output()


def test_the_window_in_progress_at_sigterm_is_sent_with_its_drift_sketch(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    rows = digits.samples[:ROWS].astype(np.float32)
    agent = make_agent(telemetry_interval_s=3600.0)  # no window ends while the agent runs
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(digits.path)
    spec = spec_for("app", digits.samples[ROWS:].astype(np.float64))
    desired = fleet_pb2.DesiredState(
        device_id=agent.device_id,
        generation=1,
        models=[
            peer.assignment(digest, "1", name="digits", tenant="app", signature=signature_of(digits.path))
        ],
        drift_specs=[spec],
    )
    peer.publish_state(desired)
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest, tenant="app")
    stub = agent.stub()
    for _ in range(2):
        stub.Infer(inference_pb2.InferRequest(tenant="app", inputs=from_arrays({"X": rows})), timeout=10)

    assert agent.terminate() == 0
    [window] = wait_until(lambda: list(peer.telemetry), 10, "the last window, sent at stop")
    _, probs = ort.InferenceSession(str(digits.path)).run(None, {"X": rows})
    [sketch] = window.drift
    assert (sketch.tenant, sketch.model_name, sketch.model_version) == ("app", "digits", "1")
    assert plain(sketch) == scaled(build_sketch(spec, rows, probs), 2)
    assert [(m.tenant, m.inference_count) for m in window.models] == [("app", 2)]
    assert 0 < window.window_end_ms - window.window_start_ms < 3_600_000


def test_class_counts_come_from_the_output_the_signature_calls_scores(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    # logits (3 classes) first, features (8 columns) last: the signature, not the outputs' order
    # or shapes, says which output classifies.
    model = scores_beside_features(tmp_path / "scores.onnx")
    rows = np.random.default_rng(1).normal(size=(ROWS, 4)).astype(np.float32)
    csv = tmp_path / "readings.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%.9g")
    agent = make_agent(telemetry_interval_s=0.5)
    with agent.config.open("a") as f:
        f.write(
            f'\n[[tenants]]\nid = "replay"\nmodel = "m"\nqueue = 64\n[tenants.source]\nkind = "csv"\nuri = "{csv}"\n'
        )
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(model)
    reference = np.random.default_rng(2).normal(size=(200, 4))
    specs = {t: spec_for(t, reference, name="m", classes=3) for t in ("replay", "app")}
    signature = signature_of(model)
    assert [(o.name, o.meaning) for o in signature.outputs] == [
        ("logits", "scores"),
        ("features", "embeddings"),
    ]
    peer.publish_state(
        fleet_pb2.DesiredState(
            device_id=agent.device_id,
            generation=1,
            models=[peer.assignment(digest, "1", name="m", tenant=t, signature=signature) for t in specs],
            drift_specs=specs.values(),
        )
    )
    agent.start()
    agent.wait_ready()
    for tenant in specs:
        peer.wait_active(digest, tenant=tenant)
    replayed = np.loadtxt(csv, delimiter=",", ndmin=2).astype(np.float32)
    logits = ort.InferenceSession(str(model)).run(["logits"], {"x": replayed})[0]
    classes = np.bincount(logits.argmax(axis=1), minlength=3).tolist()

    def whole_passes() -> list[int] | None:
        got = totals(peer, "replay")
        if got is None or got.samples == 0 or got.samples % ROWS:
            return None
        return (
            list(got.class_counts)
            if list(got.class_counts) == [c * (got.samples // ROWS) for c in classes]
            else None
        )

    counted = wait_until(whole_passes, 60, f"class counts {classes} per pass of the replay tenant")
    assert len(counted) == 3
    agent.stub().Infer(inference_pb2.InferRequest(tenant="app", inputs=from_arrays({"x": rows})), timeout=10)
    called = wait_until(
        lambda: (s := totals(peer, "app")) and s.samples == ROWS and s, 30, "the call's sketch"
    )
    assert list(called.class_counts) == classes
    assert "not sketched or captured" not in agent.output()
