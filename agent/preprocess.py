"""Samples -> model inputs, from a :class:`~agent.tenants.PreprocessSpec`, no user code.

Images (HxWxC, BGR as OpenCV delivers them): crop, resize, colour order, scale,
per-channel mean/std, NHWC or NCHW. Audio (float samples in [-1, 1]): fixed
windows with a hop, raw or log-mel (numpy only). Sensor rows: sliding windows.
A :class:`Preprocessor` keeps the partial window between samples; everything
else is a pure function of its arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.errors import PreprocessError
from agent.postprocess import NO_LETTERBOX, Letterbox
from agent.sensors.base import Sample
from agent.tenants import PreprocessSpec


@functools.cache
def _opencv() -> Any:
    """OpenCV resizes better and faster; without it, nearest neighbour in numpy.

    Imported on first use: it costs tens of MB that a device without image
    tenants should not pay.
    """
    try:
        import cv2
    except ImportError:
        return None
    return cv2


@dataclass(frozen=True)
class Prepared:
    """One model input made from one or more samples."""

    array: np.ndarray
    seq: int
    captured_at_ms: int
    # Where the source frame sits in a letterboxed image input, to map boxes back.
    letterbox: Letterbox = NO_LETTERBOX


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    cv2 = _opencv()
    if cv2 is not None:
        out: np.ndarray = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return out.reshape((height, width, *image.shape[2:]))
    rows = (np.arange(height) * image.shape[0] // height).clip(0, image.shape[0] - 1)
    cols = (np.arange(width) * image.shape[1] // width).clip(0, image.shape[1] - 1)
    nearest: np.ndarray = image[rows][:, cols]
    return nearest


def letterbox(image: np.ndarray, height: int, width: int, fill: int = 0) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to (height, width), centred, as detectors expect."""
    scale = min(height / image.shape[0], width / image.shape[1])
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    inner = resize(image, h, w)
    top, left = (height - h) // 2, (width - w) // 2
    out = np.full((height, width, *image.shape[2:]), fill, dtype=image.dtype)
    out[top : top + h, left : left + w] = inner
    return out, Letterbox(w / width, h / height, left / width, top / height)


def image(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return image_with_box(frame, spec)[0]


def image_with_box(frame: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Letterbox]:
    box = NO_LETTERBOX
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3:
        raise PreprocessError(f"an image must be HxW or HxWxC, got shape {list(frame.shape)}")
    if spec.crop is not None:
        top, left, h, w = spec.crop
        if top + h > frame.shape[0] or left + w > frame.shape[1]:
            raise PreprocessError(
                f"crop {list(spec.crop)} does not fit a {frame.shape[0]}x{frame.shape[1]} frame"
            )
        frame = frame[top : top + h, left : left + w]
    if spec.resize is not None and spec.fit == "letterbox":
        frame, box = letterbox(frame, *spec.resize)
    elif spec.resize is not None:
        frame = resize(frame, *spec.resize)
    if spec.color == "rgb" and frame.shape[2] == 3:
        frame = frame[:, :, ::-1]
    elif spec.color == "gray" and frame.shape[2] == 3:
        frame = (frame.astype(np.float32) @ np.array([0.114, 0.587, 0.299], np.float32))[:, :, None]
    x = frame.astype(np.float64) * spec.scale
    if spec.mean:
        x = x - _per_channel(spec.mean, x.shape[2], "mean")
    if spec.std:
        x = x / _per_channel(spec.std, x.shape[2], "std")
    if spec.layout == "nchw":
        x = x.transpose(2, 0, 1)
    return x, box


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise PreprocessError(f"{what} has {len(values)} values for {channels} channels")
    return np.asarray(values, np.float64)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, shape (n_mels, n_fft // 2 + 1)."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(0, to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins) / np.maximum(upper - centre, 1e-9)
    bank: np.ndarray = np.maximum(0.0, np.minimum(rising, falling))
    return bank


def log_mel(window: np.ndarray, sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Log mel energies of half-overlapping Hann frames: shape (frames, n_mels)."""
    if len(window) < n_fft:
        raise PreprocessError(f"an audio window of {len(window)} samples is shorter than n_fft={n_fft}")
    hop = n_fft // 2
    count = 1 + (len(window) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    frames = window[idx] * np.hanning(n_fft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels).T
    out: np.ndarray = np.log(mel + 1e-6)
    return out


class Preprocessor:
    """Turns a tenant's samples into model inputs, keeping partial windows."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self._buffer: np.ndarray | None = None
        self._first_seq = 0
        self._first_at = 0

    def reset(self) -> None:
        """Forget partial windows (the source was reopened)."""
        self._buffer = None

    def feed(self, sample: Sample) -> Iterator[Prepared]:
        spec = self.spec
        if sample.kind == "image":
            x, box = image_with_box(sample.data, spec)
            yield replace(self._finish(x, sample.seq, sample.captured_at_ms), letterbox=box)
            return
        data = np.asarray(sample.data)
        if sample.kind == "audio" and data.ndim == 2:
            data = data.mean(axis=1)
        if sample.kind == "rows" and data.ndim == 1:
            data = data[None, :]
        if not spec.window:
            for row in data if sample.kind == "rows" else [data]:
                yield self._finish(self._features(row, sample), sample.seq, sample.captured_at_ms)
            return
        if self._buffer is None or len(self._buffer) == 0:
            self._buffer = data
            self._first_seq, self._first_at = sample.seq, sample.captured_at_ms
        else:
            self._buffer = np.concatenate([self._buffer, data])
        hop = spec.hop or spec.window
        while len(self._buffer) >= spec.window:
            window = self._buffer[: spec.window]
            yield self._finish(self._features(window, sample), self._first_seq, self._first_at)
            self._buffer = self._buffer[hop:]
            self._first_seq, self._first_at = sample.seq, sample.captured_at_ms

    def _features(self, data: np.ndarray, sample: Sample) -> np.ndarray:
        if sample.kind == "audio" and self.spec.features == "log_mel":
            return log_mel(data.astype(np.float64), sample.sample_rate, self.spec.n_fft, self.spec.n_mels)
        return data.astype(np.float64) * self.spec.scale

    def _finish(self, x: np.ndarray, seq: int, at: int) -> Prepared:
        if self.spec.batch:
            x = x[None, ...]
        return Prepared(np.ascontiguousarray(x, dtype=np.dtype(self.spec.dtype)), seq, at)
