"""Model outputs -> labelled classes, detections or masks, by configuration. Pure numpy.

A tenant's ``[tenants.postprocess]`` table names one ``kind``:

- ``classes``: scores (optionally through softmax or sigmoid) -> the top ``top_k``
  classes with their labels;
- ``threshold``: per-class sigmoid (or raw) scores kept when at least ``threshold``
  (multi-label models, voice activity);
- ``ssd``: anchor-box decoding for SSD/BlazeFace-style detectors (box regressors and
  class logits per anchor, anchors generated from ``strides``) + non-maximum suppression;
- ``yolo``: YOLO-style rows of (cx, cy, w, h, [objectness], class scores) in input
  pixels, either layout (v5: anchors x rows, v8: rows x anchors) + non-maximum suppression;
- ``mask``: per-pixel argmax over the class axis -> a class-index mask and pixel counts
  (a single-channel probability map: 1 where it reaches ``threshold``, else 0).

Boxes come out normalised to the *source* frame (x0, y0, x1, y1 in 0..1) once the
letterbox padding the preprocessing added is undone, so a detection is where the
object was in what the camera saw, not in the model's padded square.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from edgefleet_proto.tenancy import POSTPROCESS_ACTIVATIONS

from agent.errors import TenantError

KINDS = ("", "classes", "threshold", "ssd", "yolo", "mask")
ACTIVATIONS = POSTPROCESS_ACTIVATIONS


@dataclass(frozen=True)
class PostprocessSpec:
    kind: str = ""  # "" publishes raw tensors only
    output: str = ""  # scores / predictions output; default: the one the signature calls scores (mask for masks), else the first
    boxes_output: str = ""  # ssd: the box regressors; default: the output with the most values per anchor
    activation: str = "none"
    top_k: int = 5
    threshold: float = 0.5
    iou_threshold: float = 0.3
    max_detections: int = 100
    labels: tuple[str, ...] = ()
    # ssd: one entry per anchor layer; layers with equal strides share a grid.
    strides: tuple[int, ...] = ()
    anchors_per_layer: int = 2
    anchor_offset: float = 0.5
    # yolo: "v5" (N x (5 + classes)) or "v8" ((4 + classes) x N).
    yolo_layout: str = "v8"
    # Publish the raw output tensors beside the post-processed results.
    raw: bool = False


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Detection:
    index: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, normalised to the source frame


@dataclass(frozen=True)
class Letterbox:
    """Where the source frame sits inside the model input (all normalised to the input)."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_source(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        sx, sy = self.scale_x or 1.0, self.scale_y or 1.0
        mapped = (
            (x0 - self.pad_x) / sx,
            (y0 - self.pad_y) / sy,
            (x1 - self.pad_x) / sx,
            (y1 - self.pad_y) / sy,
        )
        c = [min(1.0, max(0.0, v)) for v in mapped]
        return (c[0], c[1], c[2], c[3])


# The identity: the frame filled the whole model input.
NO_LETTERBOX = Letterbox()


@dataclass(frozen=True)
class Outcome:
    classes: tuple[ClassScore, ...] = ()
    detections: tuple[Detection, ...] = ()
    mask: np.ndarray | None = None
    mask_counts: dict[int, int] = field(default_factory=dict)

    @property
    def confidence(self) -> float | None:
        """The score the confidence gate reads: the best class or detection, if any."""
        scores = [c.score for c in self.classes] + [d.score for d in self.detections]
        return max(scores) if scores else None


def label(spec: PostprocessSpec, index: int) -> str:
    return spec.labels[index] if 0 <= index < len(spec.labels) else str(index)


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / np.sum(e, axis=-1, keepdims=True)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))
    return out


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        return softmax(x)
    if activation == "sigmoid":
        return sigmoid(x)
    return x


def _scores(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name:
        if name not in outputs:
            raise TenantError(f"postprocess: the model has no output {name!r} (it has {sorted(outputs)})")
        return np.asarray(outputs[name], dtype=np.float64)
    return np.asarray(next(iter(outputs.values())), dtype=np.float64)


def _first_row(x: np.ndarray) -> np.ndarray:
    """The first item of a batch, flattened to one row of per-class scores."""
    if x.ndim >= 2 and x.shape[0] == 1:
        x = x[0]
    return x.reshape(-1)


def top_classes(outputs: Mapping[str, np.ndarray], spec: PostprocessSpec) -> tuple[ClassScore, ...]:
    row = _activate(_first_row(_scores(outputs, spec.output)), spec.activation)
    order = np.argsort(-row, kind="stable")[: max(1, spec.top_k)]
    return tuple(ClassScore(int(i), label(spec, int(i)), float(row[i])) for i in order)


def above_threshold(outputs: Mapping[str, np.ndarray], spec: PostprocessSpec) -> tuple[ClassScore, ...]:
    row = _activate(_first_row(_scores(outputs, spec.output)), spec.activation)
    keep = np.flatnonzero(row >= spec.threshold)
    return tuple(ClassScore(int(i), label(spec, int(i)), float(row[i])) for i in keep)


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x0, y0, x1, y1) box against many."""
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    out: np.ndarray = inter / np.maximum(area + areas - inter, 1e-12)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> list[int]:
    """Greedy non-maximum suppression: indices of the kept boxes, best first."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order and len(kept) < limit:
        best = order.pop(0)
        kept.append(int(best))
        if not order:
            break
        rest = np.asarray(order)
        overlap = iou(boxes[best], boxes[rest])
        order = [int(i) for i, o in zip(rest, overlap, strict=True) if o <= iou_threshold]
    return kept


def ssd_anchors(
    height: int, width: int, strides: tuple[int, ...], per_layer: int, offset: float
) -> np.ndarray:
    """Anchor centres (x, y), normalised, in the order SSD/BlazeFace heads emit them.

    Consecutive layers with the same stride share one grid, each adding ``per_layer``
    anchors per cell (MediaPipe's SsdAnchorsCalculator with fixed-size anchors).
    """
    centres: list[tuple[float, float]] = []
    i = 0
    while i < len(strides):
        stride, repeats = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeats += 1
            i += 1
        rows, cols = -(-height // stride), -(-width // stride)
        for y in range(rows):
            for x in range(cols):
                centres.extend([((x + offset) / cols, (y + offset) / rows)] * (per_layer * repeats))
    return np.asarray(centres, dtype=np.float64).reshape(-1, 2)


def _ssd(
    outputs: Mapping[str, np.ndarray], spec: PostprocessSpec, input_hw: tuple[int, int], box: Letterbox
) -> tuple[Detection, ...]:
    height, width = input_hw
    anchors = ssd_anchors(height, width, spec.strides, spec.anchors_per_layer, spec.anchor_offset)
    scores_all = _scores(outputs, spec.output)
    if spec.boxes_output:
        raw_boxes = _scores(outputs, spec.boxes_output)
    else:
        others = [np.asarray(v) for k, v in outputs.items() if k != (spec.output or next(iter(outputs)))]
        if not others:
            raise TenantError("postprocess: ssd needs a box output beside the scores (set boxes_output)")
        raw_boxes = np.asarray(max(others, key=lambda a: a.shape[-1]), dtype=np.float64)
    n = len(anchors)
    raw_boxes = raw_boxes.reshape(-1, raw_boxes.shape[-1])
    logits = scores_all.reshape(-1, scores_all.shape[-1])
    if len(raw_boxes) != n or len(logits) != n:
        raise TenantError(
            f"postprocess: {len(anchors)} anchors from strides {list(spec.strides)} but the model gives "
            f"{len(raw_boxes)} boxes and {len(logits)} score rows"
        )
    probs = _activate(logits, spec.activation if spec.activation != "none" else "sigmoid")
    best = probs.argmax(axis=1)
    score = probs[np.arange(n), best]
    keep = np.flatnonzero(score >= spec.threshold)
    if not len(keep):
        return ()
    r = raw_boxes[keep]
    cx = r[:, 0] / width + anchors[keep, 0]
    cy = r[:, 1] / height + anchors[keep, 1]
    w, h = r[:, 2] / width, r[:, 3] / height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return _detections(boxes, score[keep], best[keep], spec, box)


def _yolo(
    outputs: Mapping[str, np.ndarray], spec: PostprocessSpec, input_hw: tuple[int, int], box: Letterbox
) -> tuple[Detection, ...]:
    pred = _scores(outputs, spec.output)
    if pred.ndim == 3:
        pred = pred[0]
    if spec.yolo_layout == "v8":
        pred = pred.T  # (4 + classes) x N -> N x (4 + classes)
        cls = pred[:, 4:]
    else:
        cls = pred[:, 5:] * pred[:, 4:5]
    if cls.shape[1] == 0:
        raise TenantError(
            f"postprocess: a {spec.yolo_layout} YOLO output needs class columns, got {pred.shape}"
        )
    cls = _activate(cls, spec.activation)
    best = cls.argmax(axis=1)
    score = cls[np.arange(len(cls)), best]
    keep = np.flatnonzero(score >= spec.threshold)
    height, width = input_hw
    r = pred[keep, :4]
    boxes = np.stack(
        [(r[:, 0] - r[:, 2] / 2) / width, (r[:, 1] - r[:, 3] / 2) / height,
         (r[:, 0] + r[:, 2] / 2) / width, (r[:, 1] + r[:, 3] / 2) / height],
        axis=1,
    )  # fmt: skip
    return _detections(boxes, score[keep], best[keep], spec, box)


def _detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, spec: PostprocessSpec, box: Letterbox
) -> tuple[Detection, ...]:
    if not len(boxes):
        return ()
    kept = nms(boxes, scores, spec.iou_threshold, spec.max_detections)
    out = []
    for i in kept:
        b = box.to_source((float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])))
        out.append(Detection(int(classes[i]), label(spec, int(classes[i])), float(scores[i]), b))
    return tuple(out)


def _mask(outputs: Mapping[str, np.ndarray], spec: PostprocessSpec, layout: str) -> Outcome:
    x = _scores(outputs, spec.output)
    if x.ndim == 4:
        x = x[0]
    if x.ndim != 3:
        raise TenantError(
            f"postprocess: a mask needs a (classes, H, W) or (H, W, classes) output, got {x.shape}"
        )
    axis = 0 if layout == "nchw" else -1
    if x.shape[axis] == 1:
        # One probability per pixel (a person, text): foreground where it reaches the threshold.
        mask = (_activate(x, spec.activation).take(0, axis=axis) >= spec.threshold).astype(np.uint8)
    else:
        mask = x.argmax(axis=axis).astype(np.uint8)
    values, counts = np.unique(mask, return_counts=True)
    return Outcome(mask=mask, mask_counts={int(v): int(c) for v, c in zip(values, counts, strict=True)})


def apply(
    outputs: Mapping[str, np.ndarray],
    spec: PostprocessSpec,
    input_hw: tuple[int, int] = (1, 1),
    layout: str = "nhwc",
    box: Letterbox = NO_LETTERBOX,
) -> Outcome:
    """Post-process one inference's outputs; ``input_hw`` is the model input's image size."""
    if not spec.kind:
        return Outcome()
    if spec.kind == "classes":
        return Outcome(classes=top_classes(outputs, spec))
    if spec.kind == "threshold":
        return Outcome(classes=above_threshold(outputs, spec))
    if spec.kind == "ssd":
        return Outcome(detections=_ssd(outputs, spec, input_hw, box))
    if spec.kind == "yolo":
        return Outcome(detections=_yolo(outputs, spec, input_hw, box))
    return _mask(outputs, spec, layout)


def check(spec: PostprocessSpec, output_names: list[str]) -> list[str]:
    """Problems with ``spec`` against a model's output names (empty when it fits)."""
    problems = []
    for key in ("output", "boxes_output"):
        name = getattr(spec, key)
        if name and name not in output_names:
            problems.append(f"postprocess.{key}: the model has no output {name!r} (it has {output_names})")
    if spec.kind == "ssd" and not spec.boxes_output and len(output_names) < 2:
        problems.append("postprocess: ssd needs a box output beside the scores")
    return problems
