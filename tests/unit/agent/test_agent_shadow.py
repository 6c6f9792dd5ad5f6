from __future__ import annotations

import numpy as np
import pytest

from agent.shadow import compare


def test_classifier_scores_give_top1_agreement() -> None:
    live = {"logits": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)}
    cand = {"logits": np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9], [0.7, 0.3]], np.float32)}
    c = compare(live, cand)
    assert c.top1 == pytest.approx(0.75)
    assert c.mean_abs_deviation == pytest.approx(np.mean(np.abs(live["logits"] - cand["logits"])))


def test_labels_and_regression_outputs() -> None:
    c = compare({"label": np.array([1, 2, 3])}, {"label": np.array([1, 2, 4])})
    assert c.top1 == pytest.approx(2 / 3)
    r = compare({"y": np.array([[1.0]])}, {"y": np.array([[1.5]])})
    assert r.top1 is None and r.mean_abs_deviation == pytest.approx(0.5)


def test_outputs_that_do_not_match_are_an_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        compare({"y": np.zeros((1, 2))}, {"z": np.zeros((1, 2))})


def test_a_comparison_covers_the_rows_of_its_batch() -> None:
    scores = np.zeros((5, 3), np.float32)
    assert compare({"s": scores}, {"s": scores}).rows == 5
    assert compare({"label": np.array([1, 2])}, {"label": np.array([1, 3])}).rows == 2
    assert compare({"y": np.float32(1.0)}, {"y": np.float32(2.0)}).rows == 1
    unbatched = np.zeros(3, np.float32)  # the scores of one sample, without a batch axis
    assert compare({"s": unbatched}, {"s": unbatched}).rows == 1
