"""A model version's signature as the agent keeps it: what feeds each input, what each output means.

The controller sends it with each assignment (``ModelAssignment.model_signature``); the
agent stores it in its state beside the assignment, stages the model with inputs made
from it when the version has no sample, gives tenants that declare no inputs of
their own their constants and carried state from it, and fills in the constants and
initial states a gRPC caller leaves out. Frozen and hashable, since an
assignment is compared whole. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet_proto import fleet_pb2

from agent.feeds import InputFeed
from agent.tenants import PreprocessSpec

if TYPE_CHECKING:
    from agent.runtime import TensorSpec

SOURCE, CONSTANT, STATE = "source", "constant", "state"
SCORES, BOXES, MASK = "scores", "boxes", "mask"
NO_AXIS = -1


@dataclass(frozen=True)
class InputRole:
    name: str
    role: str = SOURCE
    # "NHWC", "NCHW", "NC", "NTC", "NT" or "" when unknown.
    layout: str = ""
    batch_axis: int = NO_AXIS
    dtype: str = "float32"
    # -1 marks a free dimension.
    shape: tuple[int, ...] = ()
    # A constant's value, or a state's initial value; one value fills the shape.
    value: tuple[float, ...] = ()
    from_output: str = ""

    def feed(self) -> InputFeed:
        """This constant or state input as a tenant feed (free dimensions as 1)."""
        return InputFeed(
            name=self.name,
            role=self.role,
            value=self.value or (0.0,),
            shape=tuple(d if d >= 0 else 1 for d in self.shape),
            dtype=self.dtype or "float32",
            from_output=self.from_output,
        )


@dataclass(frozen=True)
class OutputMeaning:
    name: str
    meaning: str = ""
    dtype: str = ""
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[InputRole, ...] = ()
    outputs: tuple[OutputMeaning, ...] = ()

    def input(self, name: str) -> InputRole | None:
        return next((i for i in self.inputs if i.name == name), None)

    def source(self) -> InputRole | None:
        """The input the tenant's source feeds."""
        return next((i for i in self.inputs if i.role == SOURCE), None)

    def scores(self) -> str:
        """The output the signature says holds the model's class scores ("" when none does): what
        drift sketches, captures and the confidence gate read as the predicted class; never
        guessed from output names or shapes."""
        return next((o.name for o in self.outputs if o.meaning == SCORES), "")

    def postprocess_outputs(self, kind: str) -> tuple[str, str]:
        """The outputs a post-processing ``kind`` reads when the tenant names none: its values
        (the output meaning ``mask`` for argmax masks, ``scores`` for the others) and, for
        anchor decoding, the ``boxes``; "" where the signature gives no output that meaning."""
        want = MASK if kind == "mask" else SCORES
        values = next((o.name for o in self.outputs if o.meaning == want), "")
        boxes = next((o.name for o in self.outputs if o.meaning == BOXES), "") if kind == "ssd" else ""
        return values, boxes

    def feeds(self) -> tuple[InputFeed, ...]:
        """The constant and state inputs, as tenant feeds."""
        return tuple(i.feed() for i in self.inputs if i.role in (CONSTANT, STATE))

    def bound(self, input_names: Sequence[str], output_names: Sequence[str]) -> ModelSignature:
        """This signature in the tensor names of the file that serves it.

        The signature is the uploaded model's; a variant made from it or added beside it (a
        TFLite file converted from an ONNX upload) may name its tensors otherwise while keeping
        their order. Names the file lacks are then bound by position, inputs and outputs alike
        (and a state's ``from_output`` with them), when the counts agree; else it is left as is.
        """
        inputs, outputs = self.inputs, self.outputs
        renamed_out: dict[str, str] = {}
        if _differs([o.name for o in outputs], output_names):
            renamed_out = {o.name: n for o, n in zip(outputs, output_names, strict=True)}
            outputs = tuple(replace(o, name=renamed_out[o.name]) for o in outputs)
        if _differs([i.name for i in inputs], input_names):
            inputs = tuple(replace(i, name=n) for i, n in zip(inputs, input_names, strict=True))
        if renamed_out:
            inputs = tuple(
                replace(i, from_output=renamed_out.get(i.from_output, i.from_output)) for i in inputs
            )
        if inputs == self.inputs and outputs == self.outputs:
            return self
        return ModelSignature(inputs, outputs)

    def completed(
        self, inputs: Mapping[str, np.ndarray], model_inputs: Sequence[TensorSpec]
    ) -> dict[str, np.ndarray]:
        """A call's inputs with the constants and states it did not send filled in: a constant
        takes its value, a state its initial value, its batch axis as long as the source
        input's batch (each row its own stream, starting afresh). What the call sent is kept
        as sent, and a source it lacks is left for the runtime to name."""
        out = dict(inputs)
        source = self.source()
        batch = 1
        if source is not None and source.name in inputs and 0 <= source.batch_axis < inputs[source.name].ndim:
            batch = inputs[source.name].shape[source.batch_axis]
        for spec in model_inputs:
            role = self.input(spec.name)
            if spec.name in out or role is None or role.role not in (CONSTANT, STATE):
                continue
            feed = role.feed()
            shape = list(feed.shape or tuple(d if d > 0 else 1 for d in spec.shape))
            if role.role == STATE and 0 <= role.batch_axis < len(shape):
                shape[role.batch_axis] = batch
            out[spec.name] = (
                replace(feed, shape=tuple(shape)).initial().astype(np.dtype(spec.dtype), copy=False)
            )
        return out

    @property
    def stateful(self) -> bool:
        return any(i.role == STATE for i in self.inputs)

    @classmethod
    def from_proto(cls, msg: fleet_pb2.ModelSignature) -> ModelSignature:
        return cls(
            inputs=tuple(
                InputRole(
                    name=i.name,
                    role=i.role or SOURCE,
                    layout=i.layout,
                    batch_axis=int(i.batch_axis),
                    dtype=i.dtype or "float32",
                    shape=tuple(int(d) for d in i.shape),
                    value=tuple(float(v) for v in i.value),
                    from_output=i.from_output,
                )
                for i in msg.inputs
            ),
            outputs=tuple(
                OutputMeaning(o.name, o.meaning, o.dtype, tuple(int(d) for d in o.shape)) for o in msg.outputs
            ),
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelSignature:
        """From the dict :func:`dataclasses.asdict` made of one (lists back to tuples)."""
        return cls(
            inputs=tuple(
                InputRole(**{**i, "shape": tuple(i.get("shape", ())), "value": tuple(i.get("value", ()))})
                for i in doc.get("inputs", ())
            ),
            outputs=tuple(
                OutputMeaning(**{**o, "shape": tuple(o.get("shape", ()))}) for o in doc.get("outputs", ())
            ),
        )


def _differs(names: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether ``names`` must be bound to ``actual`` by position: the same count, other names."""
    return bool(names) and len(names) == len(actual) and set(names) != set(actual)


def framed(pre: PreprocessSpec, signature: ModelSignature | None) -> PreprocessSpec:
    """A tenant's preprocessing with audio framed as its model's source input wants.

    An ``NT`` source input of fixed length (silero-vad's ``(1, 576)``) takes windows of
    that many samples, with the tenant's hop (else one window); a tenant that declares
    its own window keeps it. Anything else is left as the tenant declared it.
    """
    if pre.window or signature is None:
        return pre
    source = signature.input(pre.input) if pre.input else signature.source()
    if source is None or source.layout != "NT" or len(source.shape) != 2 or source.shape[1] <= 0:
        return pre
    window = source.shape[1]
    return replace(pre, window=window, hop=pre.hop or window)


def framing_problem(pre: PreprocessSpec, signature: ModelSignature | None) -> str | None:
    """Why a tenant's ``hop`` has no window to move, or None: without its own ``window`` the
    hop moves the fixed length of an ``NT`` source input (:func:`framed`), and only that."""
    if not pre.hop or pre.window:
        return None
    what = "preprocess.hop: needs a window"
    if signature is None:
        return f"{what}: the version has no signature giving its audio input a length"
    source = signature.input(pre.input) if pre.input else signature.source()
    if source is None:
        return f"{what}: the signature names no source input to frame"
    if source.layout != "NT":
        return (
            f"{what}: the source input {source.name!r} is not audio (layout {source.layout or 'unknown'}, "
            "not NT), so its length gives no window"
        )
    if len(source.shape) != 2 or source.shape[1] <= 0:
        return (
            f"{what}: the source input {source.name!r} has no fixed length (shape {list(source.shape)}); "
            "declare a window or give the input its length in the signature"
        )
    return None
