"""Several tenants on one real agent: video, WAV and CSV sources, real models, tokens, shadow.

Everything is made in the test: a small conv net, an audio net over log-mel
frames (onnx.helper), the digits classifier (scikit-learn's bundled set), an
MJPG video written with OpenCV, a WAV written with the stdlib, a CSV with numpy.
The models reach the agent the way they do in production: a desired state and
chunked artifacts from the protocol peer over the real Mosquitto.
"""

from __future__ import annotations

import grp
import os
import stat
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet_proto import fleet_pb2, inference_pb2, inference_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from agent.preprocess import log_mel
from agent.tenants import hash_token
from agent.tensors import from_arrays, to_numpy
from tests.support.agent_calls import Stream, outputs
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.models import dense_of_size, digits_classifier, signature_of, small_conv
from tests.support.waiting import wait_until

cv2 = pytest.importorskip("cv2")
# The shadow candidate is an under-trained classifier on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:lbfgs failed to converge")

TOKENS = {t: f"{t}-token-{'x' * 16}" for t in ("vision", "audio", "tabular", "cam")}
RATE, CHUNK, WINDOW, HOP, N_FFT, N_MELS = 16000, 4000, 8000, 4000, 512, 40


def audio_model(path: Path) -> Path:
    """Mean over time of the log-mel frames, then a dense layer to 5 keywords."""
    w = np.random.default_rng(3).standard_normal((N_MELS, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["mel", "axes"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["scores"]),
        ],
        "keywords",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["N", "T", N_MELS])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@dataclass
class Media:
    video: Path
    frames: list[np.ndarray]
    wav: Path
    pcm: np.ndarray
    csv: Path
    rows: np.ndarray


def make_media(folder: Path, rows: np.ndarray) -> Media:
    video = folder / "door.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    rng = np.random.default_rng(5)
    for _ in range(8):
        writer.write(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    writer.release()
    capture = cv2.VideoCapture(str(video))
    frames = []
    while (got := capture.read())[0]:
        frames.append(got[1])
    capture.release()
    wav = folder / "speech.wav"
    t = np.arange(2 * RATE) / RATE
    pcm = (8000 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(np.int16)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    csv = folder / "readings.csv"
    np.savetxt(csv, rows, delimiter=",")
    return Media(video, frames, wav, pcm, csv, rows)


def tenants_toml(media: Media, extra: str = "") -> str:
    return f"""
[[tenants]]
id = "vision"
model = "doorcam"
token = "{TOKENS["vision"]}"
queue = 64
rate_hz = 50
[tenants.source]
kind = "video"
uri = "{media.video}"
loop = true
[tenants.preprocess]
resize = [32, 32]
color = "rgb"
scale = {1 / 255!r}
layout = "nchw"

[[tenants]]
id = "audio"
model = "keywords"
token = "{TOKENS["audio"]}"
queue = 64
[tenants.source]
kind = "wav"
uri = "{media.wav}"
chunk = {CHUNK}
[tenants.preprocess]
window = {WINDOW}
hop = {HOP}
features = "log_mel"
n_fft = {N_FFT}
n_mels = {N_MELS}

[[tenants]]
id = "tabular"
model = "digits"
token = "{TOKENS["tabular"]}"
queue = 64
results = ["grpc", "mqtt"]
[tenants.source]
kind = "csv"
uri = "{media.csv}"
{extra}"""


@pytest.fixture
def fleet(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> Iterator[tuple[AgentProcess, Peer, dict[str, Path], Media]]:
    digits = digits_classifier(tmp_path / "digits.onnx")
    models = {
        "vision": small_conv(tmp_path / "conv.onnx"),
        "audio": audio_model(tmp_path / "audio.onnx"),
        "tabular": digits.path,
        "tabular.shadow": digits_classifier(tmp_path / "digits2.onnx", seed=1, max_iter=5).path,
    }
    media = make_media(tmp_path, digits.samples[:20])
    agent = make_agent(telemetry_interval_s=1.0)
    broken = (
        '\n[[tenants]]\nid = "cam"\ntoken = "'
        + TOKENS["cam"]
        + '"\n[tenants.source]\nkind = "camera"\nuri = "/dev/video-unplugged-7"\n'
    )
    with agent.config.open("a") as f:
        f.write(tenants_toml(media, broken))
    peer = make_peer(agent.device_id)
    names = {"vision": "doorcam", "audio": "keywords", "tabular": "digits", "tabular.shadow": "digits"}
    versions = {"vision": "1", "audio": "1", "tabular": "1", "tabular.shadow": "2"}
    assignments = [
        peer.assignment(
            peer.add_artifact(path),
            versions[t],
            name=names[t],
            tenant=t,
            # As the controller sends it: the shadow agreement reads the scores it names.
            signature=signature_of(path) if names[t] == "digits" else None,
        )
        for t, path in models.items()
    ]
    peer.publish_desired(1, *assignments)
    agent.start()
    agent.wait_ready()
    for a in assignments:
        peer.wait_active(a.artifact_digest, tenant=a.tenant)
    yield agent, peer, models, media


def test_three_tenants_match_their_models_run_directly(
    fleet: tuple[AgentProcess, Peer, dict[str, Path], Media],
) -> None:
    agent, peer, models, media = fleet
    # The peer is logged in as the controller; results are not a contract kind it decodes.
    over_mqtt: list[Any] = []
    results_filter = f"edgefleet/v1/devices/{agent.device_id}/results/#"
    peer.client.message_callback_add(results_filter, lambda client, userdata, msg: over_mqtt.append(msg))
    peer.client.subscribe(results_filter, qos=1)
    vision = Stream(agent, "vision", TOKENS["vision"])
    audio = Stream(agent, "audio", TOKENS["audio"])
    tabular = Stream(agent, "tabular", TOKENS["tabular"])

    session = {t: ort.InferenceSession(str(p)) for t, p in models.items()}
    for r in vision.collect(len(media.frames)):
        frame = cv2.resize(media.frames[r.seq % len(media.frames)], (32, 32), interpolation=cv2.INTER_AREA)[
            :, :, ::-1
        ]
        x = (frame.astype(np.float64) / 255).transpose(2, 0, 1)[None].astype(np.float32)
        want = session["vision"].run(None, {"image": x})[0]
        np.testing.assert_allclose(outputs(r)["logits"], want, rtol=1e-4, atol=1e-5)
        assert (r.tenant, r.model_name, r.model_version) == ("vision", "doorcam", "1")

    signal = media.pcm.astype(np.float32) / 32768.0
    for r in audio.collect(3):
        window = signal[r.seq * CHUNK : r.seq * CHUNK + WINDOW].astype(np.float64)
        x = log_mel(window, RATE, N_FFT, N_MELS)[None].astype(np.float32)
        want = session["audio"].run(None, {"mel": x})[0]
        np.testing.assert_allclose(outputs(r)["scores"], want, rtol=1e-4, atol=1e-4)

    for r in tabular.collect(len(media.rows)):
        x = media.rows[r.seq][None].astype(np.float32)
        label, probabilities = session["tabular"].run(None, {"X": x})
        got = outputs(r)
        np.testing.assert_array_equal(got["label"], label)
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-4, atol=1e-6)

    # The tabular tenant also publishes its results under the device's MQTT subtree.
    wait_until(lambda: over_mqtt, 20, "results over MQTT")
    first = inference_pb2.Result.FromString(over_mqtt[0].payload)
    assert over_mqtt[0].topic == f"edgefleet/v1/devices/{agent.device_id}/results/tabular"
    assert first.tenant == "tabular" and set(first.outputs) == {"label", "probabilities"}

    # The unplugged camera is reported and retried; the others went on meanwhile.
    lost = wait_until(
        lambda: [e for e in peer.events if e.kind == "source_lost" and e.attributes["tenant"] == "cam"][1:],
        30,
        "two source_lost events for the camera",
    )
    assert "cannot be opened" in lost[0].message and int(lost[-1].attributes["attempt"]) >= 2
    assert vision.collect(1, timeout=30)  # the looping video kept producing meanwhile

    # Shadow agreement and per-tenant stats reach the controller in telemetry.
    def whole_passes() -> list[fleet_pb2.ShadowStats] | None:
        # The CSV is replayed after it ends: wait for telemetry covering whole passes over it.
        got = [s for t in list(peer.telemetry) for s in t.shadows if s.tenant == "tabular" and s.compared]
        compared = sum(s.compared for s in got)
        return got if compared and compared % len(media.rows) == 0 else None

    shadows = wait_until(whole_passes, 30, "shadow stats over whole passes in telemetry")
    assert {(s.candidate_model_name, s.candidate_model_version, s.live_model_version) for s in shadows} == {
        ("digits", "2", "1")
    }
    rows, direct = media.rows.astype(np.float32), {}
    for t in ("tabular", "tabular.shadow"):
        direct[t] = session[t].run(None, {"X": rows})[0]
    expected = float(np.mean(direct["tabular"] == direct["tabular.shadow"]))
    compared = sum(s.compared for s in shadows)
    agreement = sum(s.top1_agreement * s.compared for s in shadows) / compared
    assert compared >= len(rows) and 0 < expected < 1
    assert agreement == pytest.approx(expected)
    stats = [s for t in list(peer.telemetry) for s in t.tenants]
    assert {"vision", "audio", "tabular", "cam"} <= {s.tenant for s in stats}
    assert sum(s.source_failures for s in stats if s.tenant == "cam") >= 1
    assert sum(s.inferences for s in stats if s.tenant == "tabular") >= len(rows)
    assert all(s.latency_p95_ms > 0 for s in stats if s.inferences)


def test_a_tenant_token_cannot_reach_another_tenant(
    fleet: tuple[AgentProcess, Peer, dict[str, Path], Media],
) -> None:
    agent, _peer, _models, media = fleet
    stub = agent.stub()
    x = media.rows[:1].astype(np.float32)
    request = inference_pb2.InferRequest(tenant="tabular", inputs=from_arrays({"X": x}))

    ok = stub.Infer(request, metadata=[("x-edgefleet-token", TOKENS["tabular"])], timeout=10)
    assert ok.model_name == "digits"
    for token, code in [
        (TOKENS["vision"], grpc.StatusCode.PERMISSION_DENIED),
        ("not-a-token-of-anyone", grpc.StatusCode.UNAUTHENTICATED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
    ]:
        metadata = [("x-edgefleet-token", token)] if token else []
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request, metadata=metadata, timeout=10)
        assert err.value.code() == code, err.value.details()
    assert "tenant 'vision' cannot use tenant 'tabular'" in _details(stub, request, TOKENS["vision"])

    shadow = inference_pb2.InferRequest(tenant="tabular.shadow", inputs=from_arrays({"X": x}))
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(shadow, metadata=[("x-edgefleet-token", TOKENS["tabular"])], timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    stolen = Stream(agent, "audio", TOKENS["vision"])
    wait_until(lambda: stolen.error is not None, 10, "StreamResults refused")
    assert stolen.error is not None and stolen.error.code() == grpc.StatusCode.PERMISSION_DENIED

    listed = stub.ListModels(
        inference_pb2.ListModelsRequest(), metadata=[("x-edgefleet-token", TOKENS["audio"])]
    )
    assert [m.tenant for m in listed.models] == ["audio"]


def _details(
    stub: inference_pb2_grpc.InferenceServiceStub, request: inference_pb2.InferRequest, token: str
) -> str:
    try:
        stub.Infer(request, metadata=[("x-edgefleet-token", token)], timeout=10)
    except grpc.RpcError as exc:
        return str(exc.details())
    return ""


def test_controller_declares_a_tenant_and_the_memory_budget_refuses_a_big_model(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path, broker: Broker
) -> None:
    agent = make_agent(telemetry_interval_s=1.0)
    with agent.config.open("a") as f:
        f.write("[pool]\nmemory_budget_mb = 1\n")
    peer = make_peer(agent.device_id)
    small = peer.add_artifact(small_conv(tmp_path / "conv.onnx"))
    big = peer.add_artifact(dense_of_size(tmp_path / "big.onnx", 2.0))
    spec = fleet_pb2.TenantSpec(
        tenant="yard",
        model_name="conv",
        source=fleet_pb2.SourceSpec(kind="synthetic", options={"shape": "32,32,3"}),
        preprocess={"layout": "nchw", "scale": "0.00392156862745098"},
        target_rate_hz=50,
        weight=2,
        token_sha256=hash_token(TOKENS["vision"]),
    )
    desired = fleet_pb2.DesiredState(
        device_id=agent.device_id,
        generation=1,
        models=[
            peer.assignment(small, "1", name="conv", tenant="yard"),
            peer.assignment(big, "1", name="big", tenant="big"),
        ],
        tenants=[spec],
    )
    peer.publish_state(desired)
    agent.start()
    agent.wait_ready()
    peer.wait_active(small, tenant="yard")
    stream = Stream(agent, "yard", TOKENS["vision"])
    result = stream.collect(3)[0]
    assert (result.tenant, result.model_name, list(to_numpy(result.outputs["logits"]).shape)) == (
        "yard",
        "conv",
        [1, 10],
    )

    failed = wait_until(
        lambda: (e := peer.entry("big", big)) is not None and e.phase == fleet_pb2.MODEL_PHASE_FAILED and e,
        30,
        "the big model refused",
    )
    assert "memory budget of 1.0 MB" in failed.error

    bad = fleet_pb2.DesiredState(
        device_id=agent.device_id,
        generation=2,
        models=desired.models,
        tenants=[fleet_pb2.TenantSpec(tenant="x y")],
    )
    peer.publish_state(bad)
    rejected = wait_until(
        lambda: [e for e in peer.events if e.kind == "payload_rejected" and "tenant" in e.message],
        10,
        "rejected spec",
    )
    assert "invalid tenant id 'x y'" in rejected[0].message
    assert stream.collect(1)  # the running tenant was left alone

    # Declared tenants survive a restart without the broker: inference never waits for the network.
    assert agent.terminate() == 0
    broker.stop()
    agent.start()
    agent.wait_ready()
    assert Stream(agent, "yard", TOKENS["vision"]).collect(2)


def _apps_group() -> grp.struct_group:
    """A group the agent (the test's user) may give the socket to, other than its own if it can."""
    others = [g for g in os.getgroups() if g != os.getgid()]
    if others:
        return grp.getgrgid(others[0])
    if os.geteuid() == 0:
        return next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    return grp.getgrgid(os.getgid())


# Stands in for "edgefleet-apps", the group of the tenant apps.
APPS_GROUP = _apps_group()


def test_an_idle_model_is_unloaded_and_reloaded_on_the_next_call(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    agent = make_agent(telemetry_interval_s=0.2)
    with agent.config.open("a") as f:
        f.write(
            f'[pool]\nidle_unload_s = 0.5\n[api]\nsocket_mode = "0640"\nsocket_group = "{APPS_GROUP.gr_name}"\n'
        )
    peer = make_peer(agent.device_id)
    model = small_conv(tmp_path / "conv.onnx")
    digest = peer.add_artifact(model)
    peer.publish_desired(1, peer.assignment(digest, "1", name="conv"))
    agent.start()
    agent.wait_ready()
    peer.wait_active(digest)
    # Only the agent's user writes it, and only the apps' group may connect.
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o640
    assert agent.socket.stat().st_gid == APPS_GROUP.gr_gid
    wait_until(lambda: "model unloaded after idle" in agent.output(), 20, "the idle model unloaded")
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    response = agent.stub().Infer(inference_pb2.InferRequest(inputs=from_arrays({"image": x})), timeout=10)
    want = ort.InferenceSession(str(model)).run(None, {"image": x})[0]
    np.testing.assert_allclose(to_numpy(response.outputs["logits"]), want, rtol=1e-5, atol=1e-6)
    assert "model reloaded" in agent.output()


def test_a_tenant_declared_before_its_model_skips_its_samples_without_counting_errors(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> None:
    agent = make_agent(telemetry_interval_s=0.5)
    peer = make_peer(agent.device_id)
    conv = peer.add_artifact(small_conv(tmp_path / "conv.onnx"))
    spec = fleet_pb2.TenantSpec(
        tenant="yard",
        model_name="conv",
        source=fleet_pb2.SourceSpec(kind="synthetic", options={"shape": "32,32,3"}),
        preprocess={"layout": "nchw", "scale": "0.00392156862745098"},
        target_rate_hz=50,
    )
    declared = fleet_pb2.DesiredState(device_id=agent.device_id, generation=1, tenants=[spec])
    peer.publish_state(declared)
    agent.start()
    agent.wait_ready()

    def yard(since: int = 0) -> list[fleet_pb2.TenantStats]:
        with peer.lock:
            return [s for t in peer.telemetry[since:] for s in t.tenants if s.tenant == "yard"]

    wait_until(lambda: sum(s.skipped_no_model for s in yard()) >= 20, 30, "samples skipped without a model")
    before = yard()
    assert sum(s.errors for s in before) == 0, "no model is not an inference error"
    assert sum(s.inferences for s in before) == 0 and sum(s.dropped for s in before) == 0
    assert sum(s.samples for s in before) > 0
    assert agent.output().count("tenant has no active model") == 1, "logged once, not per sample"

    assigned = fleet_pb2.DesiredState(
        device_id=agent.device_id,
        generation=2,
        models=[peer.assignment(conv, "1", name="conv", tenant="yard")],
        tenants=[spec],
    )
    peer.publish_state(assigned)
    peer.wait_active(conv, tenant="yard")
    since = len(peer.telemetry)
    wait_until(
        lambda: sum(s.inferences for s in yard(since)) >= 20, 30, "inferences once the model is active"
    )
    after = yard(since)
    assert sum(s.errors for s in yard()) == 0, "not one error, before or after the model came"
    assert sum(s.skipped_no_model for s in after[1:]) == 0
    assert (
        "tenant model active" in agent.output()
        and "tenant=yard model=conv version=1 skipped=" in agent.output()
    )
