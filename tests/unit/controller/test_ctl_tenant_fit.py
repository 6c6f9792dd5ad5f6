"""A tenant spec checked against its model's signature: post-processing that fits the outputs,
input feeds that fit the inputs, a hop that has a window to move. Pure: no store, no runtime."""

from __future__ import annotations

from typing import Any

import pytest

from agent.tenants import from_proto
from controller.signature import InputRole, ModelSignature, OutputMeaning
from controller.tenant_fit import check_tenant_signature
from controller.tenants import InvalidTenantSpec, parse_tenants

FACE = ModelSignature(
    [InputRole("input", "source", "float32", [1, 128, 128, 3], "NHWC", 0)],
    [
        OutputMeaning("regressors", "boxes", "float32", [1, 896, 16]),
        OutputMeaning("classificators", "scores", "float32", [1, 896, 1]),
    ],
)
FACE_WITHOUT_MEANINGS = ModelSignature(
    FACE.inputs, [OutputMeaning(o.name, "", o.dtype, o.shape) for o in FACE.outputs]
)
YOLO = ModelSignature(
    [InputRole("images", "source", "float32", [1, 3, 640, 640], "NCHW", 0)],
    [OutputMeaning("output0", "boxes", "float32", [1, 84, 8400])],
)
CLASSIFIER = ModelSignature(
    [InputRole("x", "source", "float32", [-1, 3, -1, -1], "NCHW", 0)],
    [OutputMeaning("prob", "scores", "float32", [-1, 2])],
)
FREE_DETECTOR = ModelSignature(
    [InputRole("x", "source", "float32", [-1, 3, -1, -1], "NCHW", 0)],
    [
        OutputMeaning("scores", "scores", "float32", [-1, -1, 2]),
        OutputMeaning("boxes", "boxes", "float32", [-1, -1, 4]),
    ],
)
VAD = ModelSignature(
    [
        InputRole("input", "source", "float32", [-1, -1], "NT", 0),
        InputRole("state", "state", "float32", [2, -1, 128], "", 1, [0.0], "stateN"),
        InputRole("sr", "constant", "int64", [], "", -1, [16000.0]),
    ],
    [
        OutputMeaning("output", "scores", "float32", [-1, 1]),
        OutputMeaning("stateN", "state", "float32", [2, -1, 128]),
    ],
)
ROWS = ModelSignature(
    [InputRole("x", "source", "float32", [-1, 64], "NC", 0)],
    [OutputMeaning("y", "scores", "float32", [-1, 10])],
)
# skl2onnx's order: the integer label first, the class probabilities second.
LABEL_FIRST = ModelSignature(
    [InputRole("x", "source", "float32", [-1, 4], "NC", 0)],
    [OutputMeaning("label", "", "int64", [-1]), OutputMeaning("probabilities", "scores", "float32", [-1, 3])],
)
SSD = {"kind": "ssd", "output": "classificators", "boxes_output": "regressors", "strides": [8, 16, 16, 16]}


def tenant(model: str, **over: Any) -> dict[str, Any]:
    return {"id": "cam", "model": model, "source": {"kind": "synthetic"}} | over


def check(doc: dict[str, Any], signature: ModelSignature | None) -> None:
    (parsed,) = parse_tenants([doc], {doc["model"]})
    check_tenant_signature(parsed, signature)


@pytest.mark.parametrize(
    ("doc", "signature", "problem"),
    [
        (
            tenant("face", postprocess={**SSD, "strides": [8, 16]}),
            FACE,
            "tenant 'cam'.postprocess.strides: strides [8, 16] make 640 anchors on a 128x128 input, but "
            "output 'classificators' has 896 rows",
        ),
        (
            # Anchors are laid on the image the model gets: the tenant's resize when it has one.
            tenant("face", postprocess=SSD, preprocess={"resize": [256, 256]}),
            FACE,
            "make 3584 anchors on a 256x256 input, but output 'classificators' has 896 rows",
        ),
        (
            # With no output meant as scores, they default to the first output: the box regressors.
            tenant("face", postprocess={"kind": "ssd", "strides": [8, 16, 16, 16]}),
            FACE_WITHOUT_MEANINGS,
            "tenant 'cam'.postprocess.boxes_output: output 'classificators' has 1 value per anchor; "
            "a box needs at least 4",
        ),
        (
            tenant("face", postprocess={**SSD, "labels": ["face", "cat"]}),
            FACE,
            "tenant 'cam'.postprocess.labels: 2 labels for the 1 class of output 'classificators'",
        ),
        (
            tenant("face", postprocess={"kind": "mask", "output": "classificators"}),
            FACE,
            "tenant 'cam'.postprocess.output: a mask needs a (classes, H, W) or (H, W, classes) map; "
            "output 'classificators' is [1, 896, 1]",
        ),
        (
            tenant("face", postprocess={"kind": "yolo", "yolo_layout": "v5", "output": "classificators"}),
            FACE,
            "tenant 'cam'.postprocess.yolo_layout: a v5 YOLO output has rows of 5 + classes values; "
            "output 'classificators' is [1, 896, 1]",
        ),
        (
            tenant("yolo", postprocess={"kind": "yolo", "labels": ["person"]}),
            YOLO,
            "tenant 'cam'.postprocess.labels: 1 labels for the 80 classes of output 'output0'",
        ),
        (
            tenant("ocr", postprocess={"kind": "yolo"}),
            CLASSIFIER,
            "tenant 'cam'.postprocess.output: a v8 YOLO output is (4 + classes) x boxes; output 'prob' is [-1, 2]",
        ),
        (
            tenant("ocr", postprocess={"kind": "classes", "labels": ["0", "90", "180"]}),
            CLASSIFIER,
            "tenant 'cam'.postprocess.labels: 3 labels for the 2 classes of output 'prob'",
        ),
        (
            tenant("vad", preprocess={"hop": 512}),
            VAD,
            "tenant 'cam'.preprocess.hop: needs a window: the source input 'input' of model vad has no fixed "
            "length (shape [-1, -1])",
        ),
        (
            tenant("rows", preprocess={"hop": 8}),
            ROWS,
            "tenant 'cam'.preprocess.hop: needs a window: the source input 'x' of model rows is not audio",
        ),
        (
            tenant("rows", preprocess={"hop": 8}),
            None,
            "tenant 'cam'.preprocess.hop: needs a window: model rows has no version",
        ),
    ],
)
def test_a_tenant_that_does_not_fit_its_models_signature_is_refused_naming_the_mismatch(
    doc: dict[str, Any], signature: ModelSignature | None, problem: str
) -> None:
    with pytest.raises(InvalidTenantSpec) as caught:
        check(doc, signature)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("doc", "signature"),
    [
        (tenant("face", postprocess={**SSD, "labels": ["face"]}), FACE),
        (tenant("face", postprocess=SSD, preprocess={"resize": [128, 128], "fit": "letterbox"}), FACE),
        (tenant("yolo", postprocess={"kind": "yolo", "labels": [str(i) for i in range(80)]}), YOLO),
        (tenant("ocr", postprocess={"kind": "classes", "labels": ["0", "180"], "top_k": 1}), CLASSIFIER),
        (tenant("vad", postprocess={"kind": "threshold", "output": "output", "labels": ["speech"]}), VAD),
        (tenant("vad", preprocess={"hop": 512, "window": 576}), VAD),
        (tenant("rows", postprocess={"kind": "classes", "activation": "softmax"}), ROWS),
        # Sizes the signature leaves free are not checked here (the agent reports them at run time).
        (tenant("ocr", postprocess={"kind": "ssd", "strides": [8]}), FREE_DETECTOR),
        # Outputs left unnamed are the ones the signature gives the meaning, as the agent reads them.
        (tenant("iris", postprocess={"kind": "classes", "labels": ["a", "b", "c"]}), LABEL_FIRST),
        (tenant("face", postprocess={"kind": "ssd", "strides": [8, 16, 16, 16]}), FACE),
    ],
)
def test_a_tenant_that_fits_is_accepted(doc: dict[str, Any], signature: ModelSignature) -> None:
    check(doc, signature)


@pytest.mark.parametrize(
    ("postprocess", "problem"),
    [
        (
            {"kind": "classes", "activation": "relu"},
            "postprocess.activation: must be one of none, softmax, sigmoid",
        ),
        ({"kind": "yolo", "yolo_layout": "v7"}, "postprocess.yolo_layout: must be one of v5, v8"),
        ({"kind": "classes", "top_k": 0}, "postprocess.top_k: expected a whole number of at least 1"),
        ({"kind": "classes", "top_k": 2.5}, "postprocess.top_k: expected a whole number of at least 1"),
        ({"kind": "ssd", "strides": [8, 0]}, "postprocess.strides: expected whole numbers of at least 1"),
        ({"kind": "threshold", "threshold": -0.1}, "postprocess.threshold: expected a number of at least 0"),
        (
            {"kind": "threshold", "threshold": "high"},
            "postprocess.threshold: expected a number of at least 0",
        ),
        ({"kind": "classes", "raw": "maybe"}, "postprocess.raw: expected true or false"),
        ({"kind": "classes", "output": ["a", "b"]}, "postprocess.output: expected the name of an output"),
    ],
)
def test_postprocess_values_the_agent_would_refuse_are_refused_here(
    postprocess: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidTenantSpec) as caught:
        parse_tenants([tenant("m", postprocess=postprocess)], {"m"})
    assert problem in str(caught.value)


def test_the_agent_parses_every_postprocess_spec_the_controller_accepts() -> None:
    docs = [
        tenant("face", id="a", postprocess={**SSD, "labels": ["face"], "threshold": 0.6, "raw": True}),
        tenant("yolo", id="b", postprocess={"kind": "yolo", "yolo_layout": "v5", "activation": "sigmoid"}),
        tenant("ocr", id="c", postprocess={"kind": "classes", "top_k": 1, "anchor_offset": 0.5}),
    ]
    parsed = {
        t.id: from_proto(t.to_proto()).postprocess for t in parse_tenants(docs, {"face", "yolo", "ocr"})
    }
    assert parsed["a"].strides == (8, 16, 16, 16) and parsed["a"].labels == ("face",) and parsed["a"].raw
    assert (parsed["b"].yolo_layout, parsed["b"].activation) == ("v5", "sigmoid")
    assert parsed["c"].top_k == 1
