"""Whether a tenant spec fits the model it runs, as the model's signature describes it.

The agent can only find out on the device, sample by sample, that a tenant's
post-processing reads an output of the wrong shape or that its input feeds do not
match the model; each sample then fails. The controller knows the signature of the
model's newest version when the operator declares the tenant, so it refuses such a
spec at once (422 naming the tenant, the key, the output or input, and the mismatch).

Only what the signature fixes is checked: a size it leaves free (-1) is left to the
agent, which reports a misfit on the outputs it actually gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from controller.errors import InvalidTenantSpec
from controller.signature import InputRole, ModelSignature, OutputMeaning, fits

if TYPE_CHECKING:
    from controller.tenants import DeviceTenant


def check_tenant_signature(tenant: DeviceTenant, signature: ModelSignature | None) -> None:
    """InvalidTenantSpec naming the first thing in ``tenant`` that ``signature`` (its model's
    newest version's; None when the model has none) refutes."""
    where = f"tenant {tenant.id!r}"
    _check_framing(tenant, signature, where)
    if signature is None:
        return
    _check_feeds(tenant, signature, where)
    if tenant.postprocess:
        _check_postprocess(tenant, signature, f"{where}.postprocess")


def source_input(signature: ModelSignature, declared: str) -> InputRole | None:
    """The input a tenant's source feeds: the one it names, else the signature's source."""
    if declared:
        return signature.input(declared)
    return next((i for i in signature.inputs if i.role == "source"), None)


def _check_framing(tenant: DeviceTenant, signature: ModelSignature | None, where: str) -> None:
    """A hop without a window moves the window the model's audio input has (the agent frames
    audio by the fixed length of an ``NT`` source input, ``agent.signature.framed``)."""
    if "hop" not in tenant.preprocess or "window" in tenant.preprocess:
        return
    what = f"{where}.preprocess.hop: needs a window"
    if signature is None:
        raise InvalidTenantSpec(f"{what}: model {tenant.model} has no version whose signature gives one")
    source = source_input(signature, tenant.preprocess.get("input", ""))
    if source is None:
        raise InvalidTenantSpec(f"{what}: model {tenant.model} has no source input to frame")
    if source.layout != "NT":
        raise InvalidTenantSpec(
            f"{what}: the source input {source.name!r} of model {tenant.model} is not audio "
            f"(layout {source.layout or 'unknown'}, not NT), so its length gives no window"
        )
    if len(source.shape) != 2 or source.shape[1] <= 0:
        raise InvalidTenantSpec(
            f"{what}: the source input {source.name!r} of model {tenant.model} has no fixed length "
            f"(shape {source.shape}); declare a window or give the input its length in the signature"
        )


def _check_feeds(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    outputs = [o.name for o in signature.outputs]
    for feed in tenant.inputs:
        name, what = feed["name"], f"{where}.inputs.{feed['name']}"
        role = signature.input(name)
        if role is None:
            raise InvalidTenantSpec(
                f"{what}: model {tenant.model} has no input {name!r} "
                f"(its inputs: {[i.name for i in signature.inputs]})"
            )
        if role.role == "source":
            raise InvalidTenantSpec(
                f"{what}: the input is fed by the tenant's source, not by a constant or state"
            )
        if feed["dtype"] != role.dtype:
            raise InvalidTenantSpec(f"{what}.dtype: {feed['dtype']} does not match the input's {role.dtype}")
        if feed["shape"] and not fits(feed["shape"], role.shape):
            raise InvalidTenantSpec(f"{what}.shape: {feed['shape']} does not match the input's {role.shape}")
        source = feed.get("from", "")
        if source and source not in outputs:
            raise InvalidTenantSpec(
                f"{what}.from: model {tenant.model} has no output {source!r} (its outputs: {outputs})"
            )


# -- post-processing ------------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _output(
    tenant: DeviceTenant, signature: ModelSignature, key: str, where: str, default: str = ""
) -> OutputMeaning | None:
    name = tenant.postprocess.get(key, "") or default
    if not name:
        return None
    found = signature.output(name)
    if found is None:
        raise InvalidTenantSpec(
            f"{where}.{key}: model {tenant.model} has no output {name!r} "
            f"(its outputs: {[o.name for o in signature.outputs]})"
        )
    return found


def _by_meaning(signature: ModelSignature, meaning: str) -> str:
    return next((o.name for o in signature.outputs if o.meaning == meaning), "")


def _values_output(signature: ModelSignature, meaning: str) -> str:
    """The output a post-processing that names none reads, as the agent picks it: the one the
    signature gives ``meaning`` (scores, or mask for masks), else the first output."""
    return _by_meaning(signature, meaning) or (signature.outputs[0].name if signature.outputs else "")


def _without_batch(shape: Sequence[int]) -> list[int]:
    """The shape of one sample: a leading batch of 1 (or free) dropped, as the agent reads it."""
    return list(shape[1:]) if len(shape) >= 2 and shape[0] in (1, -1) else list(shape)


def _known(values: Sequence[int]) -> bool:
    return all(v >= 0 for v in values)


def _check_labels(tenant: DeviceTenant, classes: int | None, output: OutputMeaning, where: str) -> None:
    labels = [v for v in tenant.postprocess.get("labels", "").split(",") if v.strip()]
    if labels and classes is not None and len(labels) != classes:
        plural = "class" if classes == 1 else "classes"
        raise InvalidTenantSpec(
            f"{where}.labels: {len(labels)} labels for the {classes} {plural} of output {output.name!r}"
        )


def _input_size(tenant: DeviceTenant, signature: ModelSignature) -> tuple[int, int] | None:
    """The image the model gets, (height, width): the tenant's resize, else its source input's."""
    if "resize" in tenant.preprocess:
        height, width = _numbers(tenant.preprocess["resize"])
        return height, width
    source = source_input(signature, tenant.preprocess.get("input", ""))
    if source is None or len(source.shape) != 4:
        return None
    hw = {"NHWC": source.shape[1:3], "NCHW": source.shape[2:4]}.get(source.layout)
    return (hw[0], hw[1]) if hw is not None and _known(hw) else None


def _anchors(height: int, width: int, strides: Sequence[int], per_layer: int) -> int:
    """How many anchors ``agent.postprocess.ssd_anchors`` lays on an input of this size."""
    count, i = 0, 0
    while i < len(strides):
        stride, repeats = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeats, i = repeats + 1, i + 1
        count += math.ceil(height / stride) * math.ceil(width / stride) * per_layer * repeats
    return count


def _rows(output: OutputMeaning) -> int | None:
    """Rows of values per anchor (everything but the last axis), None when a size is free."""
    rows = _without_batch(output.shape)[:-1]
    return math.prod(rows) if _known(rows) else None


def _check_ssd(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    first = _values_output(signature, "scores")
    scores = _output(tenant, signature, "output", where, first)
    boxes = _output(tenant, signature, "boxes_output", where, _by_meaning(signature, "boxes"))
    if scores is None:
        return
    if boxes is None:
        # As the agent picks it: the other output with the most values per anchor.
        others = [o for o in signature.outputs if o.name != scores.name]
        if not others:
            raise InvalidTenantSpec(f"{where}.boxes_output: ssd needs a box output beside {scores.name!r}")
        boxes = max(others, key=lambda o: o.shape[-1] if o.shape else 0)
    per_box = boxes.shape[-1] if boxes.shape else 0
    if 0 <= per_box < 4:
        raise InvalidTenantSpec(
            f"{where}.boxes_output: output {boxes.name!r} has {per_box} value{'s' if per_box != 1 else ''} "
            f"per anchor; a box needs at least 4 (name the box regressors in boxes_output and the scores "
            f"in output)"
        )
    rows = {o.name: _rows(o) for o in (scores, boxes)}
    if None not in rows.values() and rows[scores.name] != rows[boxes.name]:
        raise InvalidTenantSpec(
            f"{where}.output: output {scores.name!r} has {rows[scores.name]} rows of scores but "
            f"output {boxes.name!r} has {rows[boxes.name]} boxes"
        )
    size, count = _input_size(tenant, signature), rows[scores.name]
    if size is not None and count is not None:
        strides = _numbers(tenant.postprocess.get("strides", ""))
        per_layer = int(tenant.postprocess.get("anchors_per_layer", "2"))
        anchors = _anchors(size[0], size[1], strides, per_layer)
        if anchors != count:
            raise InvalidTenantSpec(
                f"{where}.strides: strides {strides} make {anchors} anchors on a {size[0]}x{size[1]} "
                f"input, but output {scores.name!r} has {count} rows"
            )
    classes = scores.shape[-1] if scores.shape and scores.shape[-1] >= 0 else None
    _check_labels(tenant, classes, scores, where)


def _check_yolo(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    first = _values_output(signature, "scores")
    output = _output(tenant, signature, "output", where, first)
    if output is None:
        return
    layout = tenant.postprocess.get("yolo_layout", "v8")
    # The agent reads the first item of a 3-D output, a 2-D one whole; a free leading axis is
    # a batch, not a table's rows.
    shape = output.shape
    table = _without_batch(shape) if len(shape) == 3 or (len(shape) == 2 and shape[0] < 0) else list(shape)
    if len(table) != 2:
        want = "(4 + classes) x boxes" if layout == "v8" else "boxes x (5 + classes)"
        raise InvalidTenantSpec(
            f"{where}.output: a {layout} YOLO output is {want}; output {output.name!r} is {output.shape}"
        )
    columns, extra = (table[0], 4) if layout == "v8" else (table[1], 5)
    if 0 <= columns <= extra:
        raise InvalidTenantSpec(
            f"{where}.yolo_layout: a {layout} YOLO output has rows of {extra} + classes values; "
            f"output {output.name!r} is {output.shape}"
        )
    _check_labels(tenant, columns - extra if columns >= 0 else None, output, where)


def _check_mask(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    first = _values_output(signature, "mask")
    output = _output(tenant, signature, "output", where, first)
    if output is not None and len(_without_batch(output.shape)) != 3:
        raise InvalidTenantSpec(
            f"{where}.output: a mask needs a (classes, H, W) or (H, W, classes) map; "
            f"output {output.name!r} is {output.shape}"
        )


def _check_classes(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    first = _values_output(signature, "scores")
    output = _output(tenant, signature, "output", where, first)
    if output is None:
        return
    one = _without_batch(output.shape)
    _check_labels(tenant, math.prod(one) if _known(one) else None, output, where)


_BY_KIND = {
    "classes": _check_classes,
    "threshold": _check_classes,
    "ssd": _check_ssd,
    "yolo": _check_yolo,
    "mask": _check_mask,
}


def _check_postprocess(tenant: DeviceTenant, signature: ModelSignature, where: str) -> None:
    _output(tenant, signature, "output", where)
    _output(tenant, signature, "boxes_output", where)
    _BY_KIND[tenant.postprocess["kind"]](tenant, signature, where)
