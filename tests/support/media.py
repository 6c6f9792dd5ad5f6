"""Media made in the test, the way a camera or microphone would deliver it.

A cartoon face that MediaPipe's face detector finds where it was drawn, a video
written by OpenCV, speech-like audio (a voiced harmonic series with formants and a
syllable envelope) that silero-vad scores above silence, and WAV files written with
the standard library. Nothing here comes from a dataset.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE = 16000
BACKGROUND = (90, 120, 90)


def draw_face(image: np.ndarray, cx: int, cy: int, r: int) -> None:
    """A frontal face of radius ``r`` centred on (cx, cy), drawn in place (BGR)."""
    import cv2

    cv2.ellipse(image, (cx, cy), (int(r * 0.8), r), 0, 0, 360, (150, 180, 225), -1)
    for side in (-1, 1):
        ex, ey = cx + side * int(r * 0.35), cy - int(r * 0.2)
        cv2.ellipse(image, (ex, ey), (int(r * 0.16), int(r * 0.08)), 0, 0, 360, (255, 255, 255), -1)
        cv2.circle(image, (ex, ey), int(r * 0.07), (40, 30, 20), -1)
        brow = (ex - int(r * 0.18), ey - int(r * 0.2)), (ex + int(r * 0.18), ey - int(r * 0.22))
        cv2.line(image, brow[0], brow[1], (40, 40, 60), max(2, r // 15))
    cv2.line(
        image,
        (cx, cy - int(r * 0.05)),
        (cx - int(r * 0.06), cy + int(r * 0.2)),
        (110, 130, 180),
        max(2, r // 20),
    )
    cv2.ellipse(image, (cx, cy + int(r * 0.45)), (int(r * 0.3), int(r * 0.1)), 0, 0, 360, (80, 80, 170), -1)


def face_frame(width: int, height: int, face: tuple[int, int, int] | None) -> np.ndarray:
    frame = np.full((height, width, 3), BACKGROUND, np.uint8)
    if face is not None:
        draw_face(frame, *face)
    return frame


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> list[np.ndarray]:
    """Write ``frames`` as MJPG and return them as OpenCV decodes them (what a reader sees)."""
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = []
    while (got := capture.read())[0]:
        decoded.append(got[1])
    capture.release()
    return decoded


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced, syllable-paced audio in [-1, 1] at 16 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(
        (1 / k) * np.sin(k * phase)
        * (1 + 0.8 * np.exp(-(((k * f0 - 700) / 200) ** 2)) + 0.6 * np.exp(-(((k * f0 - 1200) / 300) ** 2)))
        for k in range(1, 30)
    )  # fmt: skip
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 0.5
    out: np.ndarray = 0.3 * voiced / np.abs(voiced).max() * envelope + rng.normal(0, 0.002, len(t))
    return out


def silence(seconds: float, seed: int = 1) -> np.ndarray:
    out: np.ndarray = np.random.default_rng(seed).normal(0, 0.001, int(seconds * RATE))
    return out


def write_wav(path: Path, signal: np.ndarray) -> np.ndarray:
    """16-bit mono WAV; returns the samples as the file holds them, back in [-1, 1]."""
    pcm = np.clip(signal * 32767, -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    back: np.ndarray = pcm.astype(np.float32) / 32768.0
    return back


def text_frame(
    width: int, height: int, text: str, at: tuple[int, int], scale: float, flip: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Black ``text`` printed on white with its baseline starting at ``at`` (BGR), turned upside
    down when ``flip``; returns the frame and the text's box (x0, y0, x1, y1) in it."""
    import cv2

    frame = np.full((height, width, 3), 255, np.uint8)
    thickness = max(1, round(scale * 2))
    cv2.putText(frame, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    box = (at[0], at[1] - h, at[0] + w, at[1] + base)
    if flip:
        frame = np.ascontiguousarray(frame[::-1, ::-1])
        box = (width - box[2], height - box[3], width - box[0], height - box[1])
    return frame, box
