"""Post-processing by configuration: classes, thresholds, SSD/YOLO decoding with NMS, masks."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import TenantError
from agent.postprocess import Letterbox, PostprocessSpec, apply, check, nms, ssd_anchors
from agent.preprocess import letterbox
from agent.tenants import parse_tenant


def test_top_classes_with_softmax_and_labels() -> None:
    logits = np.array([[0.1, 3.0, 1.0]], np.float32)
    spec = PostprocessSpec(kind="classes", activation="softmax", top_k=2, labels=("cat", "dog", "bird"))
    out = apply({"logits": logits}, spec)
    assert [c.label for c in out.classes] == ["dog", "bird"]
    assert out.classes[0].score == pytest.approx(np.exp(3.0) / np.exp([0.1, 3.0, 1.0]).sum())
    assert out.confidence == out.classes[0].score


def test_threshold_keeps_only_scores_above_it() -> None:
    spec = PostprocessSpec(kind="threshold", threshold=0.5)
    out = apply({"p": np.array([[0.2, 0.7, 0.5]])}, spec)
    assert [(c.index, c.score) for c in out.classes] == [(1, 0.7), (2, 0.5)]


def test_nms_suppresses_overlapping_boxes_and_keeps_separate_ones() -> None:
    boxes = np.array([[0, 0, 1, 1], [0.05, 0, 1.05, 1], [2, 2, 3, 3]], np.float64)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5, 10) == [0, 2]


def test_blazeface_anchor_layout_has_896_anchors() -> None:
    anchors = ssd_anchors(128, 128, (8, 16, 16, 16), 2, 0.5)
    assert anchors.shape == (896, 2)
    # First grid 16x16 with 2 anchors per cell, then the 8x8 grid with 6 per cell.
    assert anchors[0].tolist() == anchors[1].tolist() == [0.5 / 16, 0.5 / 16]
    assert anchors[512].tolist() == [0.5 / 8, 0.5 / 8]


def test_ssd_decodes_one_box_at_its_anchor_and_maps_it_back_through_the_letterbox() -> None:
    anchors = ssd_anchors(128, 128, (8, 16, 16, 16), 2, 0.5)
    boxes = np.zeros((1, 896, 16), np.float32)
    scores = np.full((1, 896, 1), -10.0, np.float32)
    i = 600
    scores[0, i, 0] = 5.0
    boxes[0, i, :4] = [0.0, 0.0, 32.0, 32.0]  # centred on the anchor, 32 px square
    spec = PostprocessSpec(kind="ssd", output="scores", boxes_output="boxes", strides=(8, 16, 16, 16))
    out = apply({"boxes": boxes, "scores": scores}, spec, input_hw=(128, 128))
    assert len(out.detections) == 1
    cx, cy = anchors[i]
    assert out.detections[0].box == pytest.approx((cx - 0.125, cy - 0.125, cx + 0.125, cy + 0.125))
    # The same output from a letterboxed input (source half as tall as wide).
    box = Letterbox(1.0, 0.5, 0.0, 0.25)
    (d,) = apply({"boxes": boxes, "scores": scores}, spec, input_hw=(128, 128), box=box).detections
    assert d.box[1] == pytest.approx(max(0.0, (cy - 0.125 - 0.25) / 0.5))


def test_ssd_with_the_wrong_strides_names_the_mismatch() -> None:
    spec = PostprocessSpec(kind="ssd", output="s", boxes_output="b", strides=(8,))
    with pytest.raises(TenantError, match="512 anchors"):
        apply({"b": np.zeros((1, 896, 16)), "s": np.zeros((1, 896, 1))}, spec, input_hw=(128, 128))


@pytest.mark.parametrize("layout", ["v5", "v8"])
def test_yolo_rows_in_either_layout(layout: str) -> None:
    rows = np.zeros((3, 5 + 2))
    rows[0] = [32, 32, 16, 16, 0.9, 0.1, 0.95]
    rows[1] = [33, 32, 16, 16, 0.8, 0.1, 0.9]  # overlaps the first
    rows[2] = [10, 10, 4, 4, 0.1, 0.9, 0.1]  # objectness too low
    if layout == "v8":
        pred = np.delete(rows, 4, axis=1)
        pred[:, 4:] *= rows[:, 4:5]
        pred = pred.T[None]
    else:
        pred = rows[None]
    spec = PostprocessSpec(kind="yolo", yolo_layout=layout, threshold=0.5, labels=("a", "b"))
    out = apply({"out": pred}, spec, input_hw=(64, 64))
    assert [(d.label, round(d.score, 3)) for d in out.detections] == [("b", 0.855)]
    assert out.detections[0].box == pytest.approx((0.375, 0.375, 0.625, 0.625))


def test_mask_is_the_argmax_over_classes() -> None:
    x = np.zeros((1, 2, 2, 3))
    x[0, 0, 0, 2] = 1.0
    out = apply({"m": x}, PostprocessSpec(kind="mask"))
    assert out.mask is not None and out.mask.tolist() == [[2, 0], [0, 0]]
    assert out.mask_counts == {0: 3, 2: 1}


def test_a_single_channel_mask_is_the_probability_map_thresholded() -> None:
    # MediaPipe's selfie segmentation (1, H, W, 1) and PaddleOCR's text map (1, 1, H, W) give
    # one probability per pixel: an argmax over one channel would say "background" everywhere.
    nhwc = np.zeros((1, 2, 3, 1), np.float32)
    nhwc[0, 0, 1:, 0] = [0.7, 0.5]
    out = apply({"m": nhwc}, PostprocessSpec(kind="mask", threshold=0.5))
    assert out.mask is not None and out.mask.tolist() == [[0, 1, 1], [0, 0, 0]]
    assert out.mask_counts == {0: 4, 1: 2}
    logits = np.full((1, 1, 2, 2), -3.0, np.float32)
    logits[0, 0, 1, 1] = 2.0
    out = apply(
        {"m": logits}, PostprocessSpec(kind="mask", activation="sigmoid", threshold=0.3), layout="nchw"
    )
    assert out.mask is not None and out.mask.tolist() == [[0, 0], [0, 1]]


def test_letterbox_keeps_the_aspect_ratio_and_centres_the_frame() -> None:
    frame = np.full((50, 100, 3), 255, np.uint8)
    out, box = letterbox(frame, 100, 100)
    assert out.shape == (100, 100, 3)
    assert out[:25].max() == 0 and out[25:75].min() == 255 and out[75:].max() == 0
    assert (box.scale_x, box.scale_y, box.pad_x, box.pad_y) == (1.0, 0.5, 0.0, 0.25)


def test_postprocess_config_is_parsed_and_checked_against_the_outputs() -> None:
    spec = parse_tenant(
        {
            "id": "cam",
            "postprocess": {"kind": "ssd", "strides": [8, 16, 16, 16], "boxes_output": "regressors"},
        }
    )
    assert spec.postprocess.strides == (8, 16, 16, 16)
    assert check(spec.postprocess, ["classificators"]) == [
        "postprocess.boxes_output: the model has no output 'regressors' (it has ['classificators'])"
    ]
    with pytest.raises(TenantError, match="strides"):
        parse_tenant({"id": "cam", "postprocess": {"kind": "ssd"}})
    with pytest.raises(TenantError, match=r"unknown key\(s\) \['colour'\]"):
        parse_tenant({"id": "cam", "postprocess": {"kind": "classes", "colour": 1}})
