"""The vocabulary of tenant specs, shared by the agent and the controller. Pure code.

A tenant spec travels in ``DesiredState.tenants``; the controller checks it when
an operator sets it and the agent checks it again when it arrives, so both must
agree on what a valid id, source kind, source option, preprocessing key and
result sink are. Only the vocabulary lives here; each side phrases its errors.
"""

from __future__ import annotations

import re

# No '.' in tenant ids: "{tenant}.shadow" names the tenant's shadow candidate.
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
SHADOW_SUFFIX = ".shadow"
# The tenant an assignment, a report or a sketch that names none belongs to (the proto's "").
DEFAULT_TENANT = "default"


def tenant_or_default(tenant: str) -> str:
    """``tenant`` as named on the wire, where "" (a field left unset) is the default tenant."""
    return tenant or DEFAULT_TENANT


# Where a tenant's results go.
SINKS = frozenset({"grpc", "mqtt"})

# Options each source kind understands (anything else is a typo worth reporting).
SOURCE_OPTIONS: dict[str, frozenset[str]] = {
    "video": frozenset({"loop", "fps"}),
    "camera": frozenset({"width", "height", "fps"}),
    "wav": frozenset({"loop", "chunk"}),
    "microphone": frozenset({"sample_rate", "channels", "chunk"}),
    "csv": frozenset({"loop", "skip_header", "delimiter"}),
    "lines": frozenset({"baud", "delimiter"}),
    "synthetic": frozenset({"shape", "dtype", "count", "seed", "sample_kind"}),
}

# Image keys, then audio/sensor windowing keys.
PREPROCESS_KEYS = frozenset(
    {"input", "crop", "resize", "fit", "color", "scale", "mean", "std", "layout", "dtype"}
    | {"window", "hop", "features", "n_fft", "n_mels", "batch"}
)

# How a tenant's outputs become classes, detections or masks (agent.postprocess).
POSTPROCESS_KINDS = ("classes", "threshold", "ssd", "yolo", "mask")
POSTPROCESS_KEYS = frozenset(
    {"kind", "output", "boxes_output", "activation", "top_k", "threshold", "iou_threshold"}
    | {"max_detections", "labels", "strides", "anchors_per_layer", "anchor_offset", "yolo_layout", "raw"}
)
POSTPROCESS_ACTIVATIONS = ("none", "softmax", "sigmoid")
YOLO_LAYOUTS = ("v5", "v8")

# Model inputs a tenant feeds besides its source: a constant, or state carried from an output.
INPUT_ROLES = ("constant", "state")
INPUT_KEYS = frozenset({"role", "value", "shape", "dtype", "from"})
