"""Model signatures and sample inputs through the controller's REST API, on real third-party
models (tests/support/realmodels.py): inferred on upload, edited by the operator, checked against the
model; samples checked, stored as artifacts, shipped with each assignment; a model that
does not run on what a device would feed it refused at once with the runtime's reason."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import decode_as

from controller import drift
from controller.baselines import baselines_from_calibration
from tests.support.controller_process import Ctl
from tests.support.models import scores_beside_features
from tests.support.realmodels import sample_inputs
from tests.support.waiting import wait_until

RealModels = Callable[[str], Path]
FINAL = ("ready", "rejected", "failed")


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def upload(
    ctl: Ctl,
    name: str,
    path: Path,
    samples: dict[str, np.ndarray] | None = None,
    signature: str = "",
    **form: str,
) -> Any:
    files: dict[str, Any] = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    if samples is not None:
        files["samples"] = ("samples.npz", npz(samples), "application/octet-stream")
    data = {"version": "1", **form}
    if signature:
        data["signature"] = signature
    return ctl.api("POST", f"/v1/models/{name}/versions", data=data, files=files)


def nothing_stored(ctl: Ctl, name: str) -> None:
    assert ctl.api("GET", f"/v1/models/{name}/versions/1").status_code == 404
    store = ctl.controller.registry.store
    assert store.query("SELECT * FROM version_signatures WHERE name = ?", (name,)) == []
    artifacts = ctl.controller.registry.artifacts.root
    assert [p.name for p in artifacts.iterdir() if not p.name.startswith(".")] == []


def test_silero_without_samples_is_refused_at_once_with_onnxruntimes_reason(
    ctl: Ctl, real_models: RealModels
) -> None:
    refused = upload(ctl, "vad", real_models("silero_vad"))
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "the model does not run on its sample inputs" in detail
    assert "Pad reflect requires axis length >= 2" in detail  # onnxruntime's own words
    assert "upload sample inputs" in detail  # and what to do about it
    nothing_stored(ctl, "vad")


def test_silero_with_samples_is_accepted_and_its_variants_judged_on_them(
    ctl: Ctl, real_models: RealModels
) -> None:
    samples = sample_inputs("silero_vad", 8)
    del samples["state"]  # a state left out starts from the signature's initial value
    created = upload(ctl, "vad", real_models("silero_vad"), samples, dynamic="true", task="regression")
    assert created.status_code == 201, created.text
    body = created.json()
    roles = {
        i["name"]: (i["role"], i["layout"], i["batch_axis"], i["from_output"])
        for i in body["signature"]["inputs"]
    }
    assert roles == {
        "input": ("source", "NT", 0, ""),
        "state": ("state", "", 1, "stateN"),
        "sr": ("constant", "", -1, ""),
    }
    # The sample rate the samples hold becomes the constant's value: a tenant that declares
    # no inputs of its own feeds it from the signature.
    assert {i["name"]: i["value"] for i in body["signature"]["inputs"]}["sr"] == [16000.0]
    assert (body["sample_origin"], body["sample_count"]) == ("uploaded", 8)
    # The samples are the calibration set too, and an artifact devices can fetch.
    assert body["calibration_digest"]
    stored = ctl.controller.registry.artifacts.path(body["sample_digest"])
    with np.load(stored) as complete:
        assert complete["state"].shape == (2, 8, 128) and int(complete["sr"]) == 16000

    def final() -> dict[str, Any] | None:
        found: dict[str, Any] = ctl.api("GET", "/v1/models/vad/versions/1").json()
        return found if all(v["status"] in FINAL for v in found["variants"]) else None

    variants = {v["variant"]: v for v in wait_until(final, 300, "silero's variants judged")["variants"]}
    dynamic = variants["onnx-int8-dynamic"]
    assert dynamic["status"] in ("ready", "rejected"), dynamic
    # Judged on the uploaded samples as one stream, the state carried from the signature's pair.
    assert dynamic["report"]["streaming"] == {"state": {"state": "stateN"}, "steps": 8}


def test_mediapipe_face_signature_and_a_synthesized_sample_shipped_with_the_assignment(
    ctl: Ctl, real_models: RealModels
) -> None:
    created = upload(ctl, "face", real_models("face_detection_short_range"))
    assert created.status_code == 201, created.text
    body = created.json()
    assert [(i["name"], i["role"], i["layout"]) for i in body["signature"]["inputs"]] == [
        ("input", "source", "NHWC")
    ]
    assert {o["name"]: o["meaning"] for o in body["signature"]["outputs"]} == {
        "regressors": "boxes",
        "classificators": "scores",
    }
    assert body["sample_origin"] == "synthesized" and body["calibration_digest"] == ""
    ctl.register("cam-1")
    rollout = ctl.api("POST", "/v1/rollouts", json={"model": "face", "version": "1", "devices": ["cam-1"]})
    assert rollout.status_code == 201, rollout.text

    def assignment() -> fleet_pb2.ModelAssignment | None:
        row = ctl.controller.registry.store.query_one("SELECT desired FROM devices WHERE device_id = 'cam-1'")
        if row is None or row["desired"] is None:
            return None
        desired = decode_as(fleet_pb2.DesiredState, bytes(row["desired"]))
        return next((m for m in desired.models if m.model_name == "face"), None)

    sent = wait_until(assignment, 30, "the face model assigned to cam-1")
    assert (sent.sample_digest, sent.sample_size) == (body["sample_digest"], body["sample_size"])
    assert [(i.name, i.role, i.layout) for i in sent.model_signature.inputs] == [("input", "source", "NHWC")]
    # The device may fetch the sample by digest like the model (assigned artifacts only).
    assert ctl.controller.fleet.may_fetch("cam-1", body["sample_digest"])
    assert not ctl.controller.fleet.may_fetch("cam-2", body["sample_digest"])


def test_the_operator_edits_a_signature_and_one_that_contradicts_the_model_is_refused(
    ctl: Ctl, real_models: RealModels
) -> None:
    samples = sample_inputs("silero_vad", 4)
    assert upload(ctl, "vad", real_models("silero_vad"), samples).status_code == 201
    url = "/v1/models/vad/versions/1/signature"
    before = ctl.api("GET", url).json()
    changes: list[tuple[Callable[[dict[str, Any]], None], str]] = [
        (lambda s: s["inputs"][1].update(from_output="hidden"), "input 'state': state from output 'hidden'"),
        (lambda s: s["inputs"][2].update(dtype="float32"), "input 'sr': dtype float32 does not match"),
        (lambda s: s["inputs"].append({**s["inputs"][2], "name": "speed"}), "input 'speed' is not an input"),
        (lambda s: s["outputs"][0].update(shape=[-1]), "output 'output': rank 1"),
        (
            lambda s: s["inputs"][2].update(value=[16000.5]),
            "input 'sr': value 16000.5 is not a whole number, and the input is int64",
        ),
        (
            lambda s: s["inputs"][1].update(batch_axis=2),
            "input 'state': batch axis 2 has the fixed size 128 in the model (shape [2, -1, 128])",
        ),
        (
            # The stored samples no longer fit: 576 samples along the new axis, 4 in the state.
            lambda s: s["inputs"][0].update(batch_axis=1, shape=[-1, 576]),
            "sample arrays need the same, non-zero number of samples along their batch axes, got input: 576",
        ),
    ]
    for change, message in changes:
        wrong = ctl.api("GET", url).json()
        change(wrong)
        refused = ctl.api("PUT", url, json=wrong)
        assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
        assert ctl.api("GET", url).json() == before  # nothing stored
    # A meaning corrected and the sample rate given: stored, versioned with the model.
    edited = ctl.api("GET", url).json()
    edited["outputs"][0]["meaning"] = "scores"
    edited["inputs"][2]["value"] = [16000]
    accepted = ctl.api("PUT", url, json=edited)
    assert accepted.status_code == 200, accepted.text
    assert ctl.api("GET", url).json()["inputs"][2]["value"] == [16000.0]


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (
            {"input": np.zeros((4, 576), np.float64)},
            "sample array 'input' is float64, the input wants float32",
        ),
        ({"input": np.zeros((4, 576, 1), np.float32)}, "sample array 'input' has 3 axes"),
        ({"inputs": np.zeros((4, 576), np.float32)}, "sample array 'inputs' is not an input of the model"),
        (
            {"input": np.zeros((4, 576), np.float32), "sr": np.zeros((2, 2), np.int64)},
            "'sr' has shape [2, 2]",
        ),
        ({"input": np.zeros((4, 576), np.float32)}, "lacks input 'sr' (a constant with no value"),
    ],
)
def test_samples_that_do_not_fit_the_signature_are_refused_and_nothing_stored(
    ctl: Ctl, real_models: RealModels, samples: dict[str, np.ndarray], message: str
) -> None:
    refused = upload(ctl, "vad", real_models("silero_vad"), samples)
    assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
    nothing_stored(ctl, "vad")


def test_a_signature_given_at_upload_is_checked_against_the_model(ctl: Ctl, real_models: RealModels) -> None:
    path = real_models("ppocr_cls")
    signature = (
        '{"inputs": [{"name": "x", "role": "source", "dtype": "float32", "shape": [-1, 3, -1, -1],'
        ' "layout": "NHWC", "batch_axis": 0}], "outputs": [{"name": "out", "dtype": "float32", "shape": [-1, 2]}]}'
    )
    refused = upload(ctl, "ocr", path, signature=signature)
    assert refused.status_code == 422 and "output 'out' is not an output" in refused.json()["detail"]
    nothing_stored(ctl, "ocr")
    refused = upload(ctl, "ocr", path, signature='{"inputs": [{"name": "x"}], "outputs": []}')
    assert refused.status_code == 422 and "signature.inputs.0.role" in refused.json()["detail"]
    nothing_stored(ctl, "ocr")


def test_tenants_are_checked_against_the_signature_of_their_models_newest_version(
    ctl: Ctl, real_models: RealModels
) -> None:
    assert upload(ctl, "vad", real_models("silero_vad"), sample_inputs("silero_vad", 4)).status_code == 201
    assert upload(ctl, "face", real_models("face_detection_short_range")).status_code == 201
    ctl.register("box-1")
    path = "/v1/devices/box-1/tenants"
    mic = {"id": "mic", "model": "vad", "source": {"kind": "synthetic", "options": {"shape": "1,576"}}}
    cam = {"id": "cam", "model": "face", "source": {"kind": "synthetic", "options": {"shape": "1,128,128,3"}}}
    state = {"role": "state", "from": "stateN", "shape": [2, 1, 128]}
    sr = {"role": "constant", "value": 16000, "dtype": "int64"}
    ssd = {
        "kind": "ssd",
        "output": "classificators",
        "boxes_output": "regressors",
        "strides": [8, 16, 16, 16],
    }
    for body, problem in (
        (
            [{**cam, "postprocess": {"kind": "threshold", "output": "scores"}}],
            "tenant 'cam'.postprocess.output: model face has no output 'scores'",
        ),
        (
            [{**cam, "postprocess": {"kind": "ssd", "strides": [8, 16], "boxes_output": "boxes"}}],
            "tenant 'cam'.postprocess.boxes_output: model face has no output 'boxes'",
        ),
        (
            # BlazeFace short range lays 896 anchors on its 128x128 input: strides [8, 16, 16, 16].
            [{**cam, "postprocess": {**ssd, "strides": [8, 16]}}],
            "tenant 'cam'.postprocess.strides: strides [8, 16] make 640 anchors on a 128x128 input, "
            "but output 'classificators' has 896 rows",
        ),
        (
            [{**cam, "postprocess": {**ssd, "labels": ["face", "hand"]}}],
            "tenant 'cam'.postprocess.labels: 2 labels for the 1 class of output 'classificators'",
        ),
        (
            # Scores and boxes the wrong way round.
            [{**cam, "postprocess": {**ssd, "output": "regressors", "boxes_output": "classificators"}}],
            "tenant 'cam'.postprocess.boxes_output: output 'classificators' has 1 value per anchor",
        ),
        (
            [{**cam, "postprocess": {"kind": "mask", "output": "regressors"}}],
            "tenant 'cam'.postprocess.output: a mask needs a (classes, H, W) or (H, W, classes) map; "
            "output 'regressors' is [1, 896, 16]",
        ),
        (
            [{**cam, "postprocess": {"kind": "classes", "activation": "relu"}}],
            "tenant 'cam'.postprocess.activation: must be one of none, softmax, sigmoid",
        ),
        ([{**mic, "inputs": {"rate": sr}}], "tenant 'mic'.inputs.rate: model vad has no input 'rate'"),
        ([{**mic, "inputs": {"sr": {**sr, "dtype": "float32"}}}], "inputs.sr.dtype: float32 does not match"),
        ([{**mic, "inputs": {"input": sr}}], "inputs.input: the input is fed by the tenant's source"),
        ([{**mic, "inputs": {"state": {**state, "from": "hidden"}}}], "inputs.state.from: model vad has no"),
        ([{**mic, "inputs": {"state": {**state, "shape": [2, 1, 64]}}}], "inputs.state.shape: [2, 1, 64]"),
    ):
        refused = ctl.api("PUT", path, json=body)
        assert refused.status_code == 422 and problem in refused.json()["detail"], refused.text
        assert ctl.api("GET", path).json() == []  # nothing stored
    good = [
        {**mic, "inputs": {"sr": sr, "state": state}},
        {**cam, "postprocess": {**ssd, "labels": ["face"], "threshold": 0.5}},
        {**cam, "id": "cam-scores", "postprocess": {"kind": "threshold", "output": "classificators"}},
        # Outputs left unnamed are the ones the signature means as scores and boxes.
        {**cam, "id": "cam-unnamed", "postprocess": {"kind": "ssd", "strides": [8, 16, 16, 16]}},
    ]
    accepted = ctl.api("PUT", path, json=good)
    assert accepted.status_code == 200, accepted.text


def test_sample_inputs_larger_than_a_form_field_are_accepted(ctl: Ctl, real_models: RealModels) -> None:
    # Twelve 128x128 RGB float32 frames: 2.4 MB, more than a plain form field may hold.
    samples = sample_inputs("face_detection_short_range", 12)
    assert len(npz(samples)) > 2 * 1024 * 1024
    created = upload(ctl, "face", real_models("face_detection_short_range"), samples)
    assert created.status_code == 201, created.text
    assert (created.json()["sample_origin"], created.json()["sample_count"]) == ("uploaded", 12)


def test_a_hop_without_a_window_is_accepted_when_the_signature_gives_the_audio_length(
    ctl: Ctl, real_models: RealModels
) -> None:
    assert upload(ctl, "vad", real_models("silero_vad"), sample_inputs("silero_vad", 4)).status_code == 201
    ctl.register("mic-1")
    path = "/v1/devices/mic-1/tenants"
    mic = {
        "id": "mic",
        "model": "vad",
        "source": {"kind": "wav", "uri": "/srv/speech.wav"},
        "preprocess": {"hop": 512},
    }
    # As inferred, silero's audio input has a free length: nothing says how long a window is.
    refused = ctl.api("PUT", path, json=[mic])
    assert refused.status_code == 422, refused.text
    assert (
        "tenant 'mic'.preprocess.hop: needs a window: the source input 'input' of model vad has no fixed "
        "length (shape [-1, -1])" in refused.json()["detail"]
    )
    assert ctl.api("GET", path).json() == []
    # The operator gives the input its length (64 samples of context and 512 new ones): the
    # device frames the audio by it, so a hop alone is enough.
    url = "/v1/models/vad/versions/1/signature"
    signature = ctl.api("GET", url).json()
    signature["inputs"][0]["shape"] = [1, 576]
    stored = ctl.api("PUT", url, json=signature)
    assert stored.status_code == 200, stored.text
    accepted = ctl.api("PUT", path, json=[mic])
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()[0]["preprocess"] == {"hop": "512"}
    # A window declared with the hop is the tenant's own, whatever the signature says.
    both = {**mic, "preprocess": {"hop": 256, "window": 1024}}
    assert ctl.api("PUT", path, json=[both]).status_code == 200


def test_the_drift_baseline_of_a_multi_input_model_sketches_the_input_its_signature_says_a_source_feeds(
    ctl: Ctl, real_models: RealModels
) -> None:
    # silero-vad's samples hold its audio, its state (batch on axis 1) and its sample rate.
    assert upload(ctl, "vad", real_models("silero_vad"), sample_inputs("silero_vad", 12)).status_code == 201
    controller = ctl.controller
    skipped: set[tuple[str, str]] = set()
    done = baselines_from_calibration(
        controller.closed_loop.baselines, controller.registry, controller.registry.artifacts.path, skipped
    )
    assert (done, skipped) == ([("vad", "1")], set())
    baseline = controller.closed_loop.baselines.get("vad", "1")
    assert baseline.sketch is not None and baseline.sketch.samples == 12
    # The audio frames (12 x 576 samples), not the state or the sample rate, per band of their
    # spectrum as a device sketches an NT input.
    assert sorted(baseline.spec.features) == [f"f{i}" for i in range(drift.AUDIO_BANDS)]
    # A reference the operator puts is read the same way: it holds what the source feeds.
    frames = sample_inputs("silero_vad", 16)["input"]
    put = ctl.api(
        "PUT", "/v1/models/vad/versions/1/drift/baseline", json={"reference": {"inputs": frames.tolist()}}
    )
    assert put.status_code == 200, put.text
    assert sorted(put.json()["spec"]["features"]) == [f"f{i}" for i in range(drift.AUDIO_BANDS)]


def test_an_image_layout_whose_channel_axis_contradicts_the_model_is_refused_at_upload_and_edit(
    ctl: Ctl, real_models: RealModels
) -> None:
    # BlazeFace takes (1, 128, 128, 3): declared NCHW, its channel axis would hold 128.
    face = real_models("face_detection_short_range")
    assert upload(ctl, "face", face).status_code == 201
    url = "/v1/models/face/versions/1/signature"
    before = ctl.api("GET", url).json()
    wrong = ctl.api("GET", url).json()
    wrong["inputs"][0]["layout"] = "NCHW"
    message = (
        "input 'input': layout NCHW puts the channels on axis 1, which holds 128 in the model's shape "
        "[1, 128, 128, 3]; an image has 1 to 4 channels (axis 3 holds 3: NHWC)"
    )
    refused = ctl.api("PUT", url, json=wrong)
    assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
    assert ctl.api("GET", url).json() == before  # nothing stored
    refused = upload(ctl, "face-nchw", face, signature=json.dumps(wrong))
    assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
    assert ctl.api("GET", "/v1/models/face-nchw/versions/1").status_code == 404
    store = ctl.controller.registry.store
    assert store.query("SELECT * FROM model_versions WHERE name = 'face-nchw'") == []
    assert store.query("SELECT * FROM version_signatures WHERE name = 'face-nchw'") == []
    # The layout the model's shape fits is accepted.
    right = {**wrong, "inputs": [{**wrong["inputs"][0], "layout": "NHWC"}]}
    assert ctl.api("PUT", url, json=right).status_code == 200


def test_the_signatures_scores_output_gives_the_baselines_classes_and_the_task(
    ctl: Ctl, tmp_path: Path
) -> None:
    # logits (3 classes) first, features (8 columns) last: the signature says which classifies.
    model = scores_beside_features(tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32)
    created = upload(ctl, "m", model, {"x": x})
    assert created.status_code == 201, created.text
    body = created.json()
    assert {o["name"]: o["meaning"] for o in body["signature"]["outputs"]} == {
        "logits": "scores",
        "features": "embeddings",
    }
    assert body["task"] == "classifier"
    controller = ctl.controller
    skipped: set[tuple[str, str]] = set()
    done = baselines_from_calibration(
        controller.closed_loop.baselines, controller.registry, controller.registry.artifacts.path, skipped
    )
    assert (done, skipped) == ([("m", "1")], set())
    baseline = controller.closed_loop.baselines.get("m", "1")
    logits = ort.InferenceSession(str(model)).run(["logits"], {"x": x})[0]
    assert baseline.spec.num_classes == 3 and baseline.sketch is not None
    assert list(baseline.sketch.classes) == np.bincount(logits.argmax(axis=1), minlength=3).tolist()
    # No output classifies once the operator says the logits are an embedding: the version is
    # judged as a regression from then on.
    url = "/v1/models/m/versions/1/signature"
    edited = ctl.api("GET", url).json()
    edited["outputs"][0]["meaning"] = "embeddings"
    assert ctl.api("PUT", url, json=edited).status_code == 200
    assert ctl.api("GET", "/v1/models/m/versions/1").json()["task"] == "regression"
