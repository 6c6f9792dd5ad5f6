"""Drift math against distributions whose PSI and KL are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller import drift
from controller.drift import Sketch, SketchSpec
from controller.errors import InvalidDriftInput


def test_identical_distributions_have_zero_psi_and_kl() -> None:
    counts = [10, 20, 30, 40]
    assert drift.psi(counts, counts) == pytest.approx(0.0, abs=1e-12)
    assert drift.kl_divergence(counts, counts) == pytest.approx(0.0, abs=1e-12)
    # Scale does not matter, only proportions do.
    assert drift.psi(counts, [c * 7 for c in counts]) == pytest.approx(0.0, abs=1e-12)


def test_psi_and_kl_match_hand_computed_values() -> None:
    expected, actual = [50, 50], [80, 20]
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert drift.psi(expected, actual) == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-3)
    # KL(window || baseline) = 0.8 ln 1.6 + 0.2 ln 0.4
    assert drift.kl_divergence(actual, expected) == pytest.approx(
        0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-3
    )


def test_psi_is_symmetric_kl_is_not() -> None:
    p, q = [70, 20, 10], [30, 30, 40]
    assert drift.psi(p, q) == pytest.approx(drift.psi(q, p))
    assert drift.kl_divergence(p, q) != pytest.approx(drift.kl_divergence(q, p))


def test_empty_bins_are_smoothed_not_infinite() -> None:
    value = drift.psi([100, 0], [0, 100])
    assert math.isfinite(value) and value > 5
    smaller = drift.psi([100, 0], [0, 100], epsilon=1e-2)
    assert smaller < value


def test_shifted_normal_gives_major_psi_and_same_gives_small() -> None:
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 1, 20_000)
    edges = drift.quantile_edges(ref, 10)
    base = drift.histogram(ref, edges)
    same = drift.histogram(rng.normal(0, 1, 5_000), edges)
    shifted = drift.histogram(rng.normal(1, 1, 5_000), edges)
    assert drift.psi(base, same) < drift.PSI_MODERATE
    assert drift.psi(base, shifted) > drift.PSI_MAJOR
    # Quantile edges put about a tenth of the reference in each bin.
    assert max(base) - min(base) < 0.02 * len(ref)


def test_histogram_bins_include_underflow_and_overflow() -> None:
    assert drift.histogram([-5, 0, 0.5, 1, 9, float("nan")], (0.0, 1.0)) == (1, 2, 2)


def test_mismatched_bins_are_refused() -> None:
    with pytest.raises(InvalidDriftInput, match="edges differ"):
        drift.psi([1, 2], [1, 2, 3])
    with pytest.raises(InvalidDriftInput, match="not negative"):
        drift.psi([1, -2], [1, 2])


def test_merge_sums_bins_and_pads_classes() -> None:
    a = Sketch(3, {"f0": (1, 2)}, (1, 2), (0, 3))
    b = Sketch(4, {"f0": (3, 1)}, (1, 2, 1), (4, 0))
    m = drift.merge([a, b])
    assert m == Sketch(7, {"f0": (4, 3)}, (2, 4, 1), (4, 3))
    with pytest.raises(InvalidDriftInput):
        drift.merge([a, Sketch(1, {"f0": (1, 0, 0)})])


def test_score_names_the_drifted_feature_and_averages_features() -> None:
    base = Sketch(200, {"f0": (50, 50), "f1": (50, 50)}, (100, 100), (100, 100))
    window = Sketch(200, {"f0": (50, 50), "f1": (95, 5)}, (100, 100), (100, 100))
    result = drift.score(base, window)
    assert result.worst_feature() == "f1"
    assert result.psi == pytest.approx(result.features["f1"].psi / 2)
    shifted_classes = drift.score(base, Sketch(200, {"f0": (50, 50)}, (190, 10), (100, 100)))
    assert shifted_classes.prediction is not None
    assert shifted_classes.psi == pytest.approx(shifted_classes.prediction.psi)
    assert result.features["f0"].psi == pytest.approx(0.0, abs=1e-12)
    assert result.prediction is not None and result.prediction.psi == pytest.approx(0.0, abs=1e-12)


def test_score_skips_components_missing_on_either_side() -> None:
    base = Sketch(10, {"f0": (5, 5)})
    window = Sketch(10, {"f0": (5, 5), "f9": (10, 0)}, (3, 7), (1, 9))
    result = drift.score(base, window)
    assert set(result.features) == {"f0"}
    assert result.prediction is None and result.confidence is None


def test_reference_baseline_from_tabular_and_image_inputs() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3))
    probs = rng.dirichlet([1, 1, 1, 1], size=500)
    spec, base = drift.reference_baseline(x, probs, bins=5)
    assert set(spec.features) == {"f0", "f1", "f2"} and spec.num_classes == 4
    assert base.samples == 500 and sum(base.classes) == 500 and sum(base.confidence) == 500
    assert all(sum(c) == 500 and len(c) == len(spec.features[n]) + 1 for n, c in base.features.items())
    spec_img, base_img = drift.reference_baseline(rng.normal(size=(50, 3, 4, 4)))
    assert set(spec_img.features) == {"ch0", "ch1", "ch2"} and base_img.classes == ()
    with pytest.raises(InvalidDriftInput, match="at least 10 samples"):
        drift.reference_baseline(x[:3])
    with pytest.raises(InvalidDriftInput, match="do not match"):
        drift.reference_baseline(x, probs[:10])


def test_production_baseline_waits_for_n_windows() -> None:
    windows = [Sketch(1, {"f0": (1, 0)}), Sketch(1, {"f0": (0, 1)}), Sketch(1, {"f0": (0, 1)})]
    assert drift.production_baseline(windows[:1], 2) is None
    assert drift.production_baseline(windows, 2) == Sketch(2, {"f0": (1, 1)})


def test_spec_and_sketch_round_trip_and_validation() -> None:
    spec = SketchSpec({"f0": (0.0, 1.0)}, num_classes=3)
    assert SketchSpec.from_json(spec.to_json()) == spec
    sketch = Sketch(2, {"f0": (1, 1, 0)}, (1, 1, 0), (0,) * 10)
    assert Sketch.from_json(sketch.to_json()) == sketch
    with pytest.raises(InvalidDriftInput, match="strictly increasing"):
        SketchSpec({"f0": (1.0, 1.0)})
    with pytest.raises(InvalidDriftInput):
        Sketch.from_json({"features": {}})


def test_consecutive_windows_and_buckets() -> None:
    assert drift.consecutive_above([0.3, 0.1, 0.3, 0.4], 0.25) == 2
    assert drift.consecutive_above([0.3, 0.4, 0.1], 0.25) == 0
    assert drift.bucket_start_ms(60_000, 60_000) == 0
    assert drift.bucket_start_ms(60_001, 60_000) == 60_000


def test_reference_images_are_read_per_channel_in_their_layout() -> None:
    rng = np.random.default_rng(2)
    levels = np.array([0.2, 0.5, 0.8])
    nhwc = rng.normal(levels, 0.05, size=(40, 24, 24, 3))
    # A calibration set comes without a layout: only its last axis has a channel count.
    for frames, layout in ((nhwc, ""), (nhwc, "nhwc"), (nhwc.transpose(0, 3, 1, 2), "")):
        spec, _ = drift.reference_baseline(frames, bins=5, layout=layout)
        assert sorted(spec.features) == ["ch0", "ch1", "ch2"]
        for i, level in enumerate(levels):
            edges = spec.features[f"ch{i}"]
            assert abs(edges[len(edges) // 2] - level) < 0.01
    gray = rng.normal(size=(20, 1, 16, 16))
    assert sorted(drift.reference_baseline(gray, bins=5)[0].features) == ["ch0"]
    with pytest.raises(InvalidDriftInput, match="layout 'nwhc'"):
        drift.reference_baseline(nhwc, bins=5, layout="nwhc")
