from __future__ import annotations

import numpy as np
import pytest

from agent.errors import PreprocessError
from agent.preprocess import Preprocessor, image, log_mel, mel_filterbank
from agent.sensors.base import Sample
from agent.tenants import PreprocessSpec


def test_image_crop_colour_scale_normalise_and_nchw() -> None:
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # BGR
    spec = PreprocessSpec(
        crop=(1, 2, 2, 3), color="rgb", scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0,), layout="nchw"
    )
    out = image(frame, spec)
    want = (frame[1:3, 2:5, ::-1].astype(np.float64) * 0.5 - np.array([1.0, 2.0, 3.0])) / 2.0
    np.testing.assert_allclose(out, want.transpose(2, 0, 1))


def test_image_resize_keeps_channels_and_gray_is_one_channel() -> None:
    frame = np.full((48, 64, 3), 200, np.uint8)
    assert image(frame, PreprocessSpec(resize=(32, 16))).shape == (32, 16, 3)
    gray = image(frame, PreprocessSpec(color="gray"))
    assert gray.shape == (48, 64, 1)
    np.testing.assert_allclose(gray, 200.0, rtol=1e-5)


def test_bad_crop_and_channel_counts_are_named() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(PreprocessError, match="crop"):
        image(frame, PreprocessSpec(crop=(0, 0, 5, 5)))
    with pytest.raises(PreprocessError, match="mean has 2 values for 3 channels"):
        image(frame, PreprocessSpec(mean=(1.0, 2.0)))


def test_log_mel_puts_a_tone_in_the_right_band() -> None:
    rate, n_fft, n_mels = 16000, 512, 40
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 1000 * t)
    features = log_mel(tone, rate, n_fft, n_mels)
    assert features.shape == (1 + (rate - n_fft) // (n_fft // 2), n_mels)
    bank = mel_filterbank(rate, n_fft, n_mels)
    band = int(np.argmax(bank[:, round(1000 * n_fft / rate)]))
    assert int(np.argmax(features.mean(axis=0))) == band


def test_audio_windows_with_hop_span_samples() -> None:
    p = Preprocessor(PreprocessSpec(window=4, hop=2))
    out = []
    for seq in range(3):
        out += list(p.feed(Sample("audio", np.arange(3, dtype=np.float32) + 3 * seq, seq, 0, 8000)))
    assert [o.array.tolist() for o in out] == [[[0, 1, 2, 3]], [[2, 3, 4, 5]], [[4, 5, 6, 7]]]
    assert all(o.array.dtype == np.float32 for o in out)


def test_sensor_rows_one_at_a_time_or_windowed() -> None:
    rows = np.arange(6, dtype=np.float64).reshape(3, 2)
    single = [p.array for r in rows for p in Preprocessor(PreprocessSpec()).feed(Sample("rows", r, 0, 0))]
    assert [a.shape for a in single] == [(1, 2)] * 3
    windowed = Preprocessor(PreprocessSpec(window=2, hop=1))
    got = [p.array for i, r in enumerate(rows) for p in windowed.feed(Sample("rows", r, i, 0))]
    np.testing.assert_array_equal(
        np.stack(got), np.stack([rows[None, :2], rows[None, 1:]]).astype(np.float32)
    )
