"""The agent's drift sketch builder, checked against the controller's drift math."""

from __future__ import annotations

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2

from agent.drift_sketch import AUDIO_BANDS, Sketcher, build_sketch, probabilities_of
from controller import drift


def spec_for(names: list[str], edges: tuple[float, ...], classes: int = 3) -> fleet_pb2.DriftSpec:
    spec = fleet_pb2.DriftSpec(
        tenant="default",
        model_name="m",
        model_version="1",
        confidence_edges=list(drift.CONFIDENCE_EDGES),
        num_classes=classes,
    )
    for name in names:
        spec.features.add(name=name, edges=list(edges))
    return spec


def as_controller_sketch(msg: fleet_pb2.DriftSketch) -> drift.Sketch:
    return drift.Sketch(
        samples=msg.samples,
        features={h.name: tuple(h.counts) for h in msg.features},
        classes=tuple(msg.class_counts),
        confidence=tuple(msg.confidence.counts),
    )


def test_tabular_sketch_bins_like_the_controller() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 2))
    x[0, 0] = np.nan
    probs = rng.dirichlet([1, 1, 1], size=200)
    edges = (-1.0, 0.0, 1.0)
    msg = build_sketch(spec_for(["f0", "f1"], edges), x, probs)
    assert msg.samples == 200
    assert [h.name for h in msg.features] == ["f0", "f1"]
    for i, h in enumerate(msg.features):
        assert tuple(h.counts) == drift.histogram(x[:, i], edges)
        assert list(h.edges) == list(edges)
    assert list(msg.class_counts) == np.bincount(probs.argmax(axis=1), minlength=3).tolist()
    assert tuple(msg.confidence.counts) == drift.histogram(probs.max(axis=1), drift.CONFIDENCE_EDGES)


def test_image_inputs_are_sketched_per_channel_mean() -> None:
    x = np.zeros((4, 2, 3, 3), dtype=np.float32)
    x[:, 1] = 5.0
    msg = build_sketch(spec_for(["ch0", "ch1"], (1.0,)), x)
    assert {h.name: list(h.counts) for h in msg.features} == {"ch0": [4, 0], "ch1": [0, 4]}
    assert not msg.HasField("confidence") and list(msg.class_counts) == [0, 0, 0]


def test_features_without_edges_are_skipped() -> None:
    msg = build_sketch(spec_for(["f1"], (0.0,)), np.array([[5.0, -1.0]]))
    assert [(h.name, list(h.counts)) for h in msg.features] == [("f1", [1, 0])]


def test_sketcher_adds_a_window_up_and_drains_it() -> None:
    sketcher = Sketcher()
    assert not sketcher.observe("default", "m", "1", np.zeros((1, 1)))
    sketcher.set_specs([spec_for(["f0"], (0.5,))])
    rng = np.random.default_rng(0)
    batches = [rng.uniform(size=(5, 1)) for _ in range(4)]
    probs = [rng.dirichlet([1, 1, 1], size=5) for _ in range(4)]
    for b, p in zip(batches, probs, strict=True):
        assert sketcher.observe("default", "m", "1", b, p)
    (window,) = sketcher.drain()
    whole = build_sketch(spec_for(["f0"], (0.5,)), np.vstack(batches), np.vstack(probs))
    assert window == whole
    assert sketcher.drain() == []


def test_a_bad_batch_leaves_the_window_alone() -> None:
    sketcher = Sketcher()
    sketcher.set_specs([spec_for(["f0"], (0.5,))])
    sketcher.observe("default", "m", "1", np.ones((2, 1)), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="do not match"):
        sketcher.observe("default", "m", "1", np.ones((2, 1)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="expected"):
        sketcher.observe("default", "m", "1", np.ones((2, 1, 1, 1, 1)))
    (window,) = sketcher.drain()
    assert window.samples == 2


def test_round_trip_scores_zero_against_itself() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(500, 3))
    spec_c, baseline = drift.reference_baseline(ref, rng.dirichlet([1, 1], size=500))
    spec = fleet_pb2.DriftSpec(confidence_edges=list(spec_c.confidence_edges), num_classes=2)
    for name, edges in spec_c.features.items():
        spec.features.add(name=name, edges=list(edges))
    same = build_sketch(spec, ref, rng.dirichlet([1, 1], size=500))
    shifted = build_sketch(spec, ref + 2.0)
    assert drift.score(baseline, as_controller_sketch(same)).psi < drift.PSI_MODERATE
    assert drift.score(baseline, as_controller_sketch(shifted)).psi > drift.PSI_MAJOR


def test_features_with_different_edge_counts_bin_like_the_controller() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 3))
    x[3, 2] = np.inf
    spec = spec_for([], ())
    spec.features.add(name="f0", edges=[0.0])
    spec.features.add(name="f2", edges=[-1.0, 0.0, 0.5, 1.0])
    spec.features.add(name="f9", edges=[0.0])  # the model has no tenth column: skipped
    msg = build_sketch(spec, x)
    assert {h.name: tuple(h.counts) for h in msg.features} == {
        "f0": drift.histogram(x[:, 0], (0.0,)),
        "f2": drift.histogram(x[:, 2], (-1.0, 0.0, 0.5, 1.0)),
    }


def test_probabilities_are_the_output_the_signature_calls_scores() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    labels = np.array([1, 0], np.int64)
    found = probabilities_of({"label": labels, "probabilities": probs}, "probabilities")
    assert found is not None and np.allclose(found, probs)
    logits = probabilities_of({"y": np.array([[0.0, 2.0]], np.float32)}, "y")
    assert logits is not None and np.allclose(logits.sum(axis=1), 1.0) and logits[0, 1] > 0.8
    # Not picked by its name, nor as the last output of two or more columns: the signature says.
    features = np.ones((2, 8), np.float32)
    scored = probabilities_of({"probabilities": probs, "logits": logits, "features": features}, "logits")
    assert scored is not None and np.allclose(scored, logits)
    assert probabilities_of({"probabilities": probs, "features": features}, "") is None
    assert probabilities_of({"label": labels, "value": np.ones((2, 1), np.float32)}, "value") is None
    assert probabilities_of({"label": labels}, "label") is None  # a class index is not a distribution


def test_a_changed_spec_starts_a_new_window() -> None:
    sketcher = Sketcher()
    sketcher.set_specs([spec_for(["f0"], (0.5,))])
    assert sketcher.wants("default", "m", "1") and not sketcher.wants("default", "m", "2")
    sketcher.observe("default", "m", "1", np.ones((2, 1)))
    sketcher.set_specs([spec_for(["f0"], (0.5,))])  # the same spec again: the window stays
    sketcher.observe("default", "m", "1", np.ones((1, 1)))
    sketcher.set_specs([spec_for(["f0"], (0.25,))])
    sketcher.observe("default", "m", "1", np.zeros((1, 1)))
    (window,) = sketcher.drain()
    assert window.samples == 1 and list(window.features[0].edges) == [0.25]


def spec_of(reference: drift.SketchSpec) -> fleet_pb2.DriftSpec:
    spec = spec_for([], ())
    for name, edges in reference.features.items():
        spec.features.add(name=name, edges=list(edges))
    return spec


def video(frames: int, seed: int) -> np.ndarray:
    """NHWC frames of one unchanging scene, each colour channel at its own level, under light
    that flickers and with sensor noise; ``seed`` picks the frames, not the scene."""
    scene = np.stack([np.full((32, 32), 40.0), np.full((32, 32), 120.0), np.full((32, 32), 200.0)], axis=-1)
    scene += np.random.default_rng(0).normal(0, 30, size=scene.shape)
    rng = np.random.default_rng(seed)
    light = rng.uniform(0.8, 1.2, size=(frames, 1, 1, 1))
    noisy = scene[None] * light + rng.normal(0, 2, size=(frames, 32, 32, 3))
    return np.clip(noisy, 0, 255).astype(np.float32) / 255.0


def test_an_nhwc_image_is_sketched_per_channel_on_its_last_axis() -> None:
    baseline_frames, later_frames = video(1000, seed=1), video(1000, seed=2)
    reference, baseline = drift.reference_baseline(baseline_frames, layout="nhwc")
    assert set(reference.features) == {"ch0", "ch1", "ch2"}
    spec = spec_of(reference)

    # The pipeline knows its layout; a gRPC caller's image is told apart by the spec's channels.
    for layout in ("nhwc", ""):
        sketcher = Sketcher()
        sketcher.set_specs([spec])
        for frame in later_frames:
            assert sketcher.observe("default", "m", "1", frame[None], layout=layout)
        (window,) = sketcher.drain()
        assert [h.name for h in window.features] == ["ch0", "ch1", "ch2"], layout
        means = later_frames.mean(axis=(1, 2), dtype=np.float64)
        for i, h in enumerate(window.features):
            assert tuple(h.counts) == drift.histogram(means[:, i], reference.features[f"ch{i}"])
        # The same scene, unchanged: no drift.
        assert drift.score(baseline, as_controller_sketch(window)).psi < drift.PSI_MODERATE

    # Red and blue swapped is a changed scene.
    swapped = build_sketch(spec, later_frames[..., ::-1], layout="nhwc")
    assert drift.score(baseline, as_controller_sketch(swapped)).psi > drift.PSI_MAJOR
    # The same frames laid out NCHW give the same sketch (the layout as a model signature writes it).
    nchw = build_sketch(spec, later_frames.transpose(0, 3, 1, 2), layout="NCHW")
    assert [tuple(h.counts) for h in nchw.features] == [tuple(h.counts) for h in window.features]


def test_windowed_rows_and_audio_bands_are_sketched_per_feature() -> None:
    rng = np.random.default_rng(4)
    # (N, T, F): windows of sensor rows over time, or log-mel frames x bands.
    windows = rng.normal(size=(60, 16, 5)) + np.arange(5)
    reference, _ = drift.reference_baseline(windows)
    assert set(reference.features) == {f"f{i}" for i in range(5)}
    msg = build_sketch(spec_of(reference), windows)
    means = windows.mean(axis=1)
    assert [h.name for h in msg.features] == [f"f{i}" for i in range(5)]
    for i, h in enumerate(msg.features):
        assert tuple(h.counts) == drift.histogram(means[:, i], reference.features[f"f{i}"])


def test_an_image_whose_layout_cannot_be_told_is_refused() -> None:
    reference, _ = drift.reference_baseline(video(20, seed=3), layout="nhwc")
    with pytest.raises(ValueError, match="3 channels"):
        build_sketch(spec_of(reference), np.zeros((2, 4, 8, 5), np.float32))


def tones(frames: int, hz: float, seed: int, length: int = 576, rate: int = 16000) -> np.ndarray:
    """Raw audio frames (N, T) of a tone near ``hz`` under noise, as an NT input takes them."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / rate
    pitch = hz * rng.uniform(0.95, 1.05, size=(frames, 1))
    loud = rng.uniform(0.2, 0.5, size=(frames, 1))
    return (loud * np.sin(2 * np.pi * pitch * t) + 0.01 * rng.normal(size=(frames, length))).astype(
        np.float32
    )


def test_raw_audio_frames_are_sketched_per_frequency_band_like_the_controller() -> None:
    reference, baseline = drift.reference_baseline(tones(300, 1500, seed=1), layout="nt")
    # Eight bands of the frame's spectrum, not 576 sample positions; the same on both sides.
    assert set(reference.features) == {f"f{i}" for i in range(drift.AUDIO_BANDS)}
    assert AUDIO_BANDS == drift.AUDIO_BANDS
    spec = spec_of(reference)
    later = tones(300, 1500, seed=2)
    msg = build_sketch(spec, later, layout="NT")
    bands = drift.audio_bands(later)
    for i, h in enumerate(msg.features):
        assert tuple(h.counts) == drift.histogram(bands[:, i], reference.features[f"f{i}"])
    assert drift.score(baseline, as_controller_sketch(msg)).psi < drift.PSI_MODERATE
    # The sound moved up the spectrum: drift.
    higher = build_sketch(spec, tones(300, 5500, seed=3), layout="nt")
    assert drift.score(baseline, as_controller_sketch(higher)).psi > drift.PSI_MAJOR
