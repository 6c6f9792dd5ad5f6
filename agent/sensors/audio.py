"""Audio: a WAV file (stdlib wave) or a microphone through ALSA (sounddevice)."""

from __future__ import annotations

import wave
from typing import Any

import numpy as np

from agent.errors import SourceError
from agent.sensors.base import Sample, now_ms
from agent.tenants import SourceSpec

_WIDTHS = {1: np.uint8, 2: np.int16, 4: np.int32}


def pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """PCM frames as float32 in [-1, 1], shape (frames, channels)."""
    data = np.frombuffer(raw, dtype=np.dtype(_WIDTHS[width]).newbyteorder("<"))
    if width == 1:
        x = (data.astype(np.float32) - 128.0) / 128.0
    else:
        x = data.astype(np.float32) / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels)


class WavSource:
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.chunk = int(spec.number("chunk", 1024))
        try:
            self._wav = wave.open(spec.uri, "rb")  # noqa: SIM115 - closed by close()
        except (OSError, EOFError, wave.Error) as exc:
            raise SourceError(f"wav {spec.uri!r} cannot be opened: {exc}") from None
        if self._wav.getsampwidth() not in _WIDTHS:
            self._wav.close()
            raise SourceError(
                f"wav {spec.uri!r}: {8 * self._wav.getsampwidth()}-bit samples are not supported"
            )
        self.rate = self._wav.getframerate()
        self._seq = 0

    def read(self) -> Sample | None:
        raw = self._wav.readframes(self.chunk)
        if not raw and self.spec.flag("loop") and self._seq:
            self._wav.rewind()
            raw = self._wav.readframes(self.chunk)
        if not raw:
            return None
        data = pcm_to_float(raw, self._wav.getsampwidth(), self._wav.getnchannels())
        sample = Sample("audio", data, self._seq, now_ms(), self.rate)
        self._seq += 1
        return sample

    def close(self) -> None:
        self._wav.close()


class MicrophoneSource:
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.rate = int(spec.number("sample_rate", 16000))
        self.chunk = int(spec.number("chunk", 1024))
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            raise SourceError(f"a microphone source needs sounddevice and PortAudio: {exc}") from None
        try:
            self._stream: Any = sounddevice.InputStream(
                samplerate=self.rate,
                channels=int(spec.number("channels", 1)),
                dtype="float32",
                device=spec.uri or None,
            )
            self._stream.start()
        except Exception as exc:  # sounddevice raises PortAudioError and ValueError
            raise SourceError(f"microphone {spec.uri or '(default)'!r} cannot be opened: {exc}") from None
        self._seq = 0

    def read(self) -> Sample | None:
        try:
            data, _overflowed = self._stream.read(self.chunk)
        except Exception as exc:
            raise SourceError(f"microphone {self.spec.uri or '(default)'!r} failed: {exc}") from None
        sample = Sample("audio", np.asarray(data, np.float32), self._seq, now_ms(), self.rate)
        self._seq += 1
        return sample

    def close(self) -> None:
        self._stream.close()
