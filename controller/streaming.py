"""Stateful (streaming) models: which input is fed back from which output.

A recurrent export takes its state as an input and returns the next state as an
output; a device feeds the output back on the next call. silero-vad names them
``state``/``stateN``; PyTorch LSTM exports ``h0``/``hn`` and ``c0``/``cn``. Such a
model must be judged on a sequence with the state carried, not on independent
samples from a zero state: quantization error that accumulates through the state
only shows there.

The pairing is read from the names and checked against dtype and rank, so an input
is never paired with an output it could not be fed from.
"""

from __future__ import annotations

from controller.inspection import TensorSpec

# The next state's name from the input's: a suffix added, or the first "0" turned into "n".
_SUFFIXES = ("N", "n", "_out", "_next", ".out", "_new")


def _names_for(name: str) -> list[str]:
    names = [name + suffix for suffix in _SUFFIXES]
    if "0" in name:
        names += [name.replace("0", "n", 1), name.replace("0", "N", 1)]
    return names


def _fits(value: TensorSpec, into: TensorSpec) -> bool:
    if value.dtype != into.dtype or len(value.shape) != len(into.shape):
        return False
    return all(a == b or a < 0 or b < 0 for a, b in zip(value.shape, into.shape, strict=True))


def state_pairs(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, str]:
    """{state input name: the output that feeds it on the next call}."""
    by_name = {o.name: o for o in outputs}
    pairs: dict[str, str] = {}
    for spec in inputs:
        match = next((by_name[n] for n in _names_for(spec.name) if n in by_name), None)
        if match is not None and spec.dtype.startswith("float") and _fits(match, spec):
            pairs[spec.name] = match.name
    return pairs
