"""Stateful (streaming) models: which input is fed back from which output, as the model's
signature says (:mod:`controller.signature` pairs them when a version is uploaded; the
operator may correct it).

A recurrent export takes its state as an input and returns the next state as an
output; a device feeds the output back on the next call. Such a model must be judged on
a sequence with the state carried, not on independent samples from a zero state:
quantization error that accumulates through the state only shows there.
"""

from __future__ import annotations

from controller.signature import ModelSignature


def state_pairs(signature: ModelSignature) -> dict[str, str]:
    """{state input name: the output that feeds it on the next call}."""
    return signature.state_pairs()


def feedback(signature: ModelSignature) -> dict[int, int]:
    """{input index: index of the output fed back into it}, in the model's tensor order."""
    inputs = [i.name for i in signature.inputs]
    outputs = [o.name for o in signature.outputs]
    return {inputs.index(i): outputs.index(o) for i, o in signature.state_pairs().items()}
