"""How far a shadow candidate's outputs are from the live model's. Pure code.

For classifiers the figure that matters is top-1 agreement, read on the output the
live version's signature calls its scores (its last axis holding the classes, or an
integer label); no output is taken for the scores by its name or shape. For
everything else the mean absolute deviation of the outputs.

Both are figures over rows (the outputs' leading axis): a batched gRPC call of N
rows is N samples for a shadow gate's minimum, not one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    # Fraction of the batch whose top-1 class matched; None when the outputs are not classes.
    top1: float | None
    mean_abs_deviation: float
    # How many samples (rows along the leading axis) the comparison covers.
    rows: int = 1


def compare(
    live: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], scores: str = ""
) -> Comparison:
    """``scores``: the output the live version's signature calls its class scores ("": none,
    so no top-1 agreement)."""
    names = [n for n in live if n in candidate and live[n].shape == candidate[n].shape]
    if not names:
        raise ValueError(
            f"the candidate's outputs {sorted(candidate)} do not match the live model's {sorted(live)}"
        )
    top1 = _top1(live[scores], candidate[scores]) if scores in names else None
    deviations = []
    for name in names:
        a, b = live[name], candidate[name]
        if np.issubdtype(a.dtype, np.number) and a.size:
            deviations.append(float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    # Rows along the leading axis, read the way top-1 reads the outputs: labels of any rank, else
    # arrays of rank 2 and up. A 1-D float array is one unbatched sample (a pipeline job with
    # batch = false), not one row per element.
    first = live[names[0]]
    batched = first.ndim >= 2 or (first.ndim == 1 and np.issubdtype(first.dtype, np.integer))
    rows = int(first.shape[0]) if batched else 1
    return Comparison(top1, float(np.mean(deviations)) if deviations else 0.0, rows)


def _top1(a: np.ndarray, b: np.ndarray) -> float | None:
    """The share of rows whose class agrees: labels compared, scores by their argmax."""
    if np.issubdtype(a.dtype, np.integer) and a.ndim <= 2:
        return float(np.mean(a == b))
    if np.issubdtype(a.dtype, np.floating) and a.ndim >= 2 and a.shape[-1] >= 2:
        return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
    return None
