"""A model signature: the one description of what each input and output of a model is.

Each input has a role: ``source`` (fed by the tenant's sensor, with a layout and the
axis a batch grows along), ``constant`` (the same value on every run, e.g. a sample
rate) or ``state`` (the named output of the previous run carried back, starting from
an initial value). Each output has a meaning (scores, boxes, embeddings, state, mask).

:func:`infer_signature` reads a first signature from the model's tensors when a version
is uploaded; the operator may correct it (:func:`check_signature` refuses one that
contradicts the model). Everything else (variant validation, calibration, staging,
tenants, drift baselines, the task a version's variants are judged as) reads the stored
signature and guesses nothing.

Inference rules, from real exports:

- a state input is paired with an output named after it (silero-vad ``state``/``stateN``,
  LSTM ``h0``/``hn``, ``c``/``cn``) whose dtype and rank fit it;
- a 0-d input (or a one-element integer vector) is a constant whose value must come from
  samples or the operator;
- 4-D with 3 or 1 channels last is NHWC, at axis 1 is NCHW; 2-D is NT (audio) when float
  with a free length, else NC; 3-D is NTC;
- the batch axis is the leading axis when it is free or 1, else none (for a state: its
  first free axis, silero-vad's ``(2, batch, 128)``);
- outputs: a state's pair is ``state``; otherwise the name (regressors, boxes, scores,
  classificators, embeddings, mask), then the shape (an image-sized map is a mask, rows
  of values per class are scores).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet_proto import fleet_pb2

from controller.errors import InvalidInputError

if TYPE_CHECKING:  # the operator CLI prints signatures without importing the runtimes
    from controller.inspection import TensorSpec

ROLES = ("source", "constant", "state")
LAYOUTS = ("NHWC", "NCHW", "NC", "NTC", "NT", "")
MEANINGS = ("scores", "boxes", "embeddings", "state", "mask", "")
# How a version's variants are judged against it (controller.optimize.validate).
CLASSIFIER, REGRESSION = "classifier", "regression"
TASKS = (CLASSIFIER, REGRESSION)
# How many axes each layout has.
LAYOUT_RANK = {"NHWC": 4, "NCHW": 4, "NC": 2, "NTC": 3, "NT": 2}
# Where an image layout keeps its channels: the axis the tenant's preprocessing fills with a
# frame's channels, and drift sketches per channel. An image has 1 (gray) to 4 (colour and alpha).
CHANNEL_AXIS = {"NHWC": 3, "NCHW": 1}
MAX_IMAGE_CHANNELS = 4
NO_AXIS = -1

# The next state's name from the input's: a suffix added, or the first "0" turned into "n".
_STATE_SUFFIXES = ("N", "n", "_out", "_next", ".out", "_new")
_MEANING_WORDS = (
    ("boxes", re.compile(r"regress|box|bbox|loc(ation)?s?\b", re.I)),
    ("scores", re.compile(r"classif|score|prob|logit|conf|cls|softmax|sigmoid", re.I)),
    ("embeddings", re.compile(r"embed|feature|descriptor", re.I)),
    ("mask", re.compile(r"mask|seg", re.I)),
)


class SignatureMismatch(InvalidInputError):
    """A signature that does not fit the model's tensors."""


@dataclass(frozen=True)
class InputRole:
    name: str
    role: str
    dtype: str
    shape: list[int]
    layout: str = ""
    # The axis a batch of samples grows along; -1: none (a constant).
    batch_axis: int = NO_AXIS
    # Constant: its value; state: its initial value (one value fills the shape).
    value: list[float] = field(default_factory=list)
    # State: the output carried back into this input on the next run.
    from_output: str = ""

    @property
    def axis(self) -> int | None:
        return None if self.batch_axis == NO_AXIS else self.batch_axis


@dataclass(frozen=True)
class OutputMeaning:
    name: str
    meaning: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelSignature:
    inputs: list[InputRole]
    outputs: list[OutputMeaning]

    def input(self, name: str) -> InputRole | None:
        return next((i for i in self.inputs if i.name == name), None)

    def output(self, name: str) -> OutputMeaning | None:
        return next((o for o in self.outputs if o.name == name), None)

    def scores(self) -> int | None:
        """Where the model's class scores are among its outputs: the first output whose meaning
        is ``scores`` (None when none is). Drift baselines and the classifier gate read it; no
        output is picked by its name or shape."""
        return next((k for k, o in enumerate(self.outputs) if o.meaning == "scores"), None)

    def task(self) -> str:
        """How a variant is judged when the operator did not say. ``classifier`` (top-1 agreement
        on the scores output) when a scores output holds a row of two or more classes per sample
        and no output is boxes; ``regression`` (relative deviation of the float outputs)
        otherwise: a single score per sample (silero-vad's speech probability) has no top-1 to
        agree on, and a detector's per-anchor scores are judged with its boxes, by their values."""
        k = self.scores()
        if k is None or any(o.meaning == "boxes" for o in self.outputs):
            return REGRESSION
        shape = self.outputs[k].shape
        return CLASSIFIER if len(shape) >= 2 and shape[-1] > 1 else REGRESSION

    def state_pairs(self) -> dict[str, str]:
        """{state input: the output that feeds it on the next run}."""
        return {i.name: i.from_output for i in self.inputs if i.role == "state"}

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [asdict(i) for i in self.inputs],
            "outputs": [asdict(o) for o in self.outputs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSignature:
        return cls(
            inputs=[InputRole(**i) for i in data["inputs"]],
            outputs=[OutputMeaning(**o) for o in data["outputs"]],
        )

    def to_proto(self) -> fleet_pb2.ModelSignature:
        msg = fleet_pb2.ModelSignature()
        for i in self.inputs:
            msg.inputs.add(
                name=i.name,
                role=i.role,
                layout=i.layout,
                batch_axis=i.batch_axis,
                dtype=i.dtype,
                shape=i.shape,
                value=i.value,
                from_output=i.from_output,
            )
        for o in self.outputs:
            msg.outputs.add(name=o.name, meaning=o.meaning, dtype=o.dtype, shape=o.shape)
        return msg

    def describe(self) -> str:
        """One line per input and output, as ``models show`` prints it."""
        lines = []
        for i in self.inputs:
            extra = {
                "source": f"{i.layout or '?'} batch axis {i.axis if i.axis is not None else '-'}",
                "constant": f"value {_values(i.value)}",
                "state": f"from {i.from_output}, initial {_values(i.value)}",
            }[i.role]
            lines.append(f"  in  {i.name} {i.dtype}{i.shape} {i.role}: {extra}")
        for o in self.outputs:
            lines.append(f"  out {o.name} {o.dtype}{o.shape} {o.meaning or '?'}")
        return "\n".join(lines)


def _values(values: Sequence[float]) -> str:
    if not values:
        return "(none)"
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"


# -- inference ------------------------------------------------------------------------


def _state_names(name: str) -> list[str]:
    names = [name + suffix for suffix in _STATE_SUFFIXES]
    if "0" in name:
        names += [name.replace("0", "n", 1), name.replace("0", "N", 1)]
    return names


def fits(value: Sequence[int], into: Sequence[int]) -> bool:
    """Whether a tensor of shape ``value`` can be fed where ``into`` is expected (-1 is free)."""
    if len(value) != len(into):
        return False
    return all(a == b or a < 0 or b < 0 for a, b in zip(value, into, strict=True))


def _state_output(spec: TensorSpec, outputs: Sequence[TensorSpec]) -> str:
    by_name = {o.name: o for o in outputs}
    for candidate in _state_names(spec.name):
        out = by_name.get(candidate)
        if out is not None and out.dtype == spec.dtype and fits(out.shape, spec.shape):
            return out.name
    return ""


def _is_constant(spec: TensorSpec) -> bool:
    return not spec.shape or (spec.shape == [1] and not spec.dtype.startswith("float"))


def _layout(spec: TensorSpec) -> str:
    shape = spec.shape
    if len(shape) == 4:
        if shape[3] in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
        return ""
    if len(shape) == 2:
        return "NT" if spec.dtype.startswith("float") and shape[1] < 0 else "NC"
    if len(shape) == 3:
        return "NTC"
    return ""


def _source_axis(shape: Sequence[int]) -> int:
    return 0 if shape and shape[0] in (-1, 1) else NO_AXIS


def _state_axis(shape: Sequence[int]) -> int:
    for wanted in (-1, 1):
        if wanted in shape:
            return list(shape).index(wanted)
    return NO_AXIS


def _input_role(spec: TensorSpec, outputs: Sequence[TensorSpec]) -> InputRole:
    base = InputRole(name=spec.name, role="source", dtype=spec.dtype, shape=list(spec.shape))
    from_output = _state_output(spec, outputs) if spec.dtype.startswith("float") else ""
    if from_output:
        return replace(
            base, role="state", batch_axis=_state_axis(spec.shape), value=[0.0], from_output=from_output
        )
    if _is_constant(spec):
        return replace(base, role="constant")
    return replace(base, layout=_layout(spec), batch_axis=_source_axis(spec.shape))


def _image_sizes(inputs: Sequence[InputRole]) -> list[list[int]]:
    sizes = []
    for i in inputs:
        if i.layout == "NHWC":
            sizes.append([i.shape[1], i.shape[2]])
        elif i.layout == "NCHW":
            sizes.append([i.shape[2], i.shape[3]])
    return sizes


def _meaning(spec: TensorSpec, states: set[str], inputs: Sequence[InputRole]) -> str:
    if spec.name in states:
        return "state"
    shape = spec.shape
    # A map the size of the image (free sizes match a free-sized image): one value per
    # pixel, whatever activation its name says it ends with (PaddleOCR's sigmoid_0.tmp_0).
    if len(shape) == 4 and any(
        fits(hw, image)
        for hw in ([shape[1], shape[2]], [shape[2], shape[3]])
        for image in _image_sizes(inputs)
    ):
        return "mask"
    for meaning, words in _MEANING_WORDS:
        if words.search(spec.name):
            return meaning
    if len(shape) == 4:
        return ""
    if len(shape) == 3 and shape[-1] >= 4:
        return "boxes"
    if len(shape) in (2, 3) and spec.dtype.startswith("float"):
        return "scores"
    return ""


def infer_signature(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> ModelSignature:
    """A first signature read from the model's tensors (see the module's rules)."""
    roles = [_input_role(spec, outputs) for spec in inputs]
    states = {r.from_output for r in roles if r.role == "state"}
    meanings = [OutputMeaning(o.name, _meaning(o, states, roles), o.dtype, list(o.shape)) for o in outputs]
    return ModelSignature(roles, meanings)


# -- checking an operator's signature against the model ---------------------------------


def check_signature(
    signature: ModelSignature, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> ModelSignature:
    """``signature`` (in the model's tensor order) if it fits the model's tensors;
    SignatureMismatch naming the first problem."""
    _check_names("input", [i.name for i in signature.inputs], [s.name for s in inputs])
    _check_names("output", [o.name for o in signature.outputs], [s.name for s in outputs])
    model_inputs = {s.name: s for s in inputs}
    model_outputs = {s.name: s for s in outputs}
    for o in signature.outputs:
        _check_tensor("output", o.name, o.dtype, o.shape, model_outputs[o.name])
        if o.meaning not in MEANINGS:
            raise SignatureMismatch(
                f"output {o.name!r}: meaning must be one of {_choices(MEANINGS)}, not {o.meaning!r}"
            )
    for i in signature.inputs:
        _check_input(i, model_inputs[i.name], model_outputs)
    # In the model's order, which devices and the validation feed inputs by.
    in_order, out_order = [s.name for s in inputs], [s.name for s in outputs]
    return ModelSignature(
        sorted(signature.inputs, key=lambda i: in_order.index(i.name)),
        sorted(signature.outputs, key=lambda o: out_order.index(o.name)),
    )


def _choices(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_names(kind: str, given: list[str], model: list[str]) -> None:
    for name in given:
        if name not in model:
            raise SignatureMismatch(f"{kind} {name!r} is not an {kind} of the model (its {kind}s: {model})")
    for name in model:
        if name not in given:
            raise SignatureMismatch(f"{kind} {name!r} of the model is missing from the signature")
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise SignatureMismatch(f"{kind} {twice[0]!r} is described twice")


def _check_tensor(kind: str, name: str, dtype: str, shape: Sequence[int], spec: TensorSpec) -> None:
    if dtype != spec.dtype:
        raise SignatureMismatch(f"{kind} {name!r}: dtype {dtype} does not match the model's {spec.dtype}")
    if len(shape) != len(spec.shape):
        raise SignatureMismatch(
            f"{kind} {name!r}: rank {len(shape)} (shape {list(shape)}) does not match the model's "
            f"{len(spec.shape)} ({spec.shape})"
        )
    if not fits(shape, spec.shape):
        raise SignatureMismatch(
            f"{kind} {name!r}: shape {list(shape)} does not match the model's {spec.shape}"
        )


def _check_values(what: str, values: Sequence[float], dtype: str) -> None:
    """Values an input of ``dtype`` can hold: whole numbers in range for an integer input."""
    if dtype == "bool":
        bad = next((v for v in values if v not in (0, 1)), None)
        if bad is not None:
            raise SignatureMismatch(f"{what}: value {bad:g} is not 0 or 1, and the input is bool")
        return
    if not dtype.startswith(("int", "uint")):
        return
    try:
        info = np.iinfo(np.dtype(dtype))
    except TypeError:
        return
    for v in values:
        if v != int(v):
            raise SignatureMismatch(f"{what}: value {v:g} is not a whole number, and the input is {dtype}")
        if not info.min <= v <= info.max:
            raise SignatureMismatch(
                f"{what}: value {v:g} is outside what {dtype} holds ({info.min} to {info.max})"
            )


def _check_channels(what: str, layout: str, shape: Sequence[int]) -> None:
    """An image layout whose channel axis the model fixes at more channels than an image has
    (NHWC declared on a (1, 3, 224, 224) input: 224 channels) contradicts the model."""
    axis = CHANNEL_AXIS[layout]
    if shape[axis] < 0 or 0 < shape[axis] <= MAX_IMAGE_CHANNELS:
        return
    other = next(name for name in CHANNEL_AXIS if name != layout)
    fits_other = 0 < shape[CHANNEL_AXIS[other]] <= MAX_IMAGE_CHANNELS
    hint = f" (axis {CHANNEL_AXIS[other]} holds {shape[CHANNEL_AXIS[other]]}: {other})" if fits_other else ""
    raise SignatureMismatch(
        f"{what}: layout {layout} puts the channels on axis {axis}, which holds {shape[axis]} in the "
        f"model's shape {list(shape)}; an image has 1 to {MAX_IMAGE_CHANNELS} channels{hint}"
    )


def _check_input(i: InputRole, spec: TensorSpec, outputs: dict[str, TensorSpec]) -> None:
    what = f"input {i.name!r}"
    _check_tensor("input", i.name, i.dtype, i.shape, spec)
    if i.role not in ROLES:
        raise SignatureMismatch(f"{what}: role must be one of {_choices(ROLES)}, not {i.role!r}")
    if i.layout not in LAYOUTS:
        raise SignatureMismatch(f"{what}: layout must be one of {_choices(LAYOUTS)}, not {i.layout!r}")
    if i.layout and LAYOUT_RANK[i.layout] != len(spec.shape):
        raise SignatureMismatch(
            f"{what}: layout {i.layout} has {LAYOUT_RANK[i.layout]} axes, the input has {len(spec.shape)}"
        )
    if i.layout in CHANNEL_AXIS:
        _check_channels(what, i.layout, spec.shape)
    if i.batch_axis != NO_AXIS and not 0 <= i.batch_axis < len(spec.shape):
        raise SignatureMismatch(
            f"{what}: batch axis {i.batch_axis} is outside its {len(spec.shape)} axes (-1 for none)"
        )
    if i.batch_axis != NO_AXIS and spec.shape[i.batch_axis] > 1:
        # Samples are stacked and fed along the batch axis: one the model fixes cannot grow.
        raise SignatureMismatch(
            f"{what}: batch axis {i.batch_axis} has the fixed size {spec.shape[i.batch_axis]} in the model "
            f"(shape {spec.shape}); a batch grows along a free axis or one of size 1 (-1 for none)"
        )
    if not all(math.isfinite(v) for v in i.value):
        raise SignatureMismatch(f"{what}: value must be finite numbers")
    _check_values(what, i.value, spec.dtype)
    fixed = all(d >= 0 for d in spec.shape)
    if len(i.value) > 1 and fixed and len(i.value) != math.prod(spec.shape):
        raise SignatureMismatch(
            f"{what}: {len(i.value)} values do not fill its shape {spec.shape} (give 1 or {math.prod(spec.shape)})"
        )
    if i.role == "state":
        out = outputs.get(i.from_output)
        if out is None:
            raise SignatureMismatch(
                f"{what}: state from output {i.from_output!r}, which the model does not have "
                f"(its outputs: {sorted(outputs)})"
            )
        if out.dtype != spec.dtype or not fits(out.shape, spec.shape):
            raise SignatureMismatch(
                f"{what}: state from output {out.name!r} ({out.dtype}{out.shape}) cannot be fed into "
                f"the input ({spec.dtype}{spec.shape})"
            )
    elif i.from_output:
        raise SignatureMismatch(f"{what}: only a state input names an output (from_output), it is a {i.role}")
