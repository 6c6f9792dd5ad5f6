"""Model signatures inferred from real third-party models, and operator signatures checked
against the model they describe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from controller.inspection import TensorSpec, inspect_artifact
from controller.signature import (
    InputRole,
    ModelSignature,
    SignatureMismatch,
    check_signature,
    infer_signature,
)

RealModels = Callable[[str], Path]


def inferred(real_models: RealModels, name: str) -> tuple[ModelSignature, list[TensorSpec], list[TensorSpec]]:
    found = inspect_artifact(real_models(name)).signature
    return infer_signature(found.inputs, found.outputs), found.inputs, found.outputs


def roles(signature: ModelSignature) -> dict[str, tuple[str, str, int, str]]:
    return {i.name: (i.role, i.layout, i.batch_axis, i.from_output) for i in signature.inputs}


def meanings(signature: ModelSignature) -> dict[str, str]:
    return {o.name: o.meaning for o in signature.outputs}


def test_silero_vad_audio_source_carried_state_and_a_sample_rate_constant(real_models: RealModels) -> None:
    sig, _, _ = inferred(real_models, "silero_vad")
    assert roles(sig) == {
        "input": ("source", "NT", 0, ""),
        "state": ("state", "", 1, "stateN"),  # (2, batch, 128): the batch is axis 1
        "sr": ("constant", "", -1, ""),
    }
    state = sig.input("state")
    assert state is not None and state.value == [0.0]
    sr = sig.input("sr")
    assert sr is not None and sr.value == []  # from samples or the operator, never guessed
    assert meanings(sig) == {"output": "scores", "stateN": "state"}
    assert sig.state_pairs() == {"state": "stateN"}


def test_mediapipe_face_detection_nhwc_image_boxes_and_scores(real_models: RealModels) -> None:
    sig, _, _ = inferred(real_models, "face_detection_short_range")
    assert roles(sig) == {"input": ("source", "NHWC", 0, "")}
    assert meanings(sig) == {"regressors": "boxes", "classificators": "scores"}


def test_mediapipe_selfie_segmentation_gives_a_mask(real_models: RealModels) -> None:
    sig, _, _ = inferred(real_models, "selfie_segmentation")
    assert roles(sig) == {"input_1": ("source", "NHWC", 0, "")}
    assert meanings(sig) == {"activation_10": "mask"}


def test_ppocr_nchw_images_a_text_map_and_class_scores(real_models: RealModels) -> None:
    det, _, _ = inferred(real_models, "ppocr_det")
    assert roles(det) == {"x": ("source", "NCHW", 0, "")}
    assert meanings(det) == {"sigmoid_0.tmp_0": "mask"}
    cls, _, _ = inferred(real_models, "ppocr_cls")
    assert roles(cls) == {"x": ("source", "NCHW", 0, "")}
    assert list(meanings(cls).values()) == ["scores"]


def test_the_task_follows_the_output_meanings(real_models: RealModels) -> None:
    """Top-1 agreement only where a scores output holds a row of classes and nothing is boxes."""
    tasks = {name: inferred(real_models, name)[0].task() for name in ("ppocr_cls", "silero_vad",
             "face_detection_short_range", "ppocr_det", "selfie_segmentation")}  # fmt: skip
    assert tasks == {
        "ppocr_cls": "classifier",  # (N, 2) class scores
        "silero_vad": "regression",  # one speech probability per window: no top-1 to agree on
        "face_detection_short_range": "regression",  # per-anchor scores beside boxes
        "ppocr_det": "regression",  # a mask
        "selfie_segmentation": "regression",
    }
    cls, _, _ = inferred(real_models, "ppocr_cls")
    assert cls.scores() == 0
    relabelled = replace(cls, outputs=[replace(o, meaning="embeddings") for o in cls.outputs])
    assert (relabelled.scores(), relabelled.task()) == (None, "regression")


def test_lstm_state_pairs_by_name_and_only_where_the_output_fits() -> None:
    inputs = [
        TensorSpec("x", "float32", [-1, 8]),
        TensorSpec("h0", "float32", [1, -1, 16]),
        TensorSpec("c", "float32", [1, -1, 16]),
    ]
    outputs = [TensorSpec("hn", "float32", [1, -1, 16]), TensorSpec("cn", "float32", [1, -1, 16])]
    assert infer_signature(inputs, outputs).state_pairs() == {"h0": "hn", "c": "cn"}
    # A name that matches but could not be fed back (rank or dtype) is no state.
    assert (
        infer_signature(
            [TensorSpec("s", "float32", [1, 4])], [TensorSpec("sN", "float32", [4])]
        ).state_pairs()
        == {}
    )
    assert (
        infer_signature([TensorSpec("s", "float32", [1])], [TensorSpec("sN", "int64", [1])]).state_pairs()
        == {}
    )


def test_the_inferred_signature_fits_its_model_and_survives_json(real_models: RealModels) -> None:
    for name in ("silero_vad", "face_detection_short_range", "ppocr_det"):
        sig, inputs, outputs = inferred(real_models, name)
        assert check_signature(sig, inputs, outputs) == sig
        assert ModelSignature.from_json(sig.to_json()) == sig
        assert len(sig.to_proto().inputs) == len(inputs)


def _with_input(sig: ModelSignature, name: str, **changes: object) -> ModelSignature:
    return replace(sig, inputs=[replace(i, **changes) if i.name == name else i for i in sig.inputs])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: _with_input(s, "state", from_output="hidden"),
            "input 'state': state from output 'hidden'",
        ),
        (
            lambda s: _with_input(s, "sr", dtype="float32"),
            "input 'sr': dtype float32 does not match the model's int64",
        ),
        (lambda s: _with_input(s, "input", shape=[-1, -1, -1]), "input 'input': rank 3"),
        (lambda s: _with_input(s, "input", layout="NHWC"), "input 'input': layout NHWC has 4 axes"),
        (lambda s: _with_input(s, "state", batch_axis=5), "input 'state': batch axis 5"),
        (lambda s: _with_input(s, "sr", role="state", from_output="output", shape=[]), "input 'sr'"),
        (
            lambda s: replace(s, inputs=[*s.inputs, InputRole("speed", "constant", "int64", [])]),
            "input 'speed' is not an input of the model",
        ),
        (lambda s: replace(s, inputs=s.inputs[:2]), "input 'sr' of the model is missing"),
        (
            lambda s: replace(s, outputs=[replace(s.outputs[0], name="prob"), *s.outputs[1:]]),
            "output 'prob' is not an output of the model",
        ),
        (
            lambda s: replace(s, outputs=[replace(s.outputs[0], shape=[-1]), *s.outputs[1:]]),
            "output 'output': rank 1",
        ),
    ],
)
def test_a_signature_that_contradicts_the_model_is_refused_naming_it(
    real_models: RealModels, change: Callable[[ModelSignature], ModelSignature], message: str
) -> None:
    sig, inputs, outputs = inferred(real_models, "silero_vad")
    with pytest.raises(SignatureMismatch, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        check_signature(change(sig), inputs, outputs)
