from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from agent.errors import SourceError
from agent.sensors.base import open_source
from agent.tenants import SourceSpec


def test_wav_source_reads_float_frames_and_ends(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    pcm = (np.arange(2500, dtype=np.int16) - 1250) * 10
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    src = open_source(SourceSpec("wav", str(path), {"chunk": "1000"}))
    chunks = []
    while (s := src.read()) is not None:
        assert s.kind == "audio" and s.sample_rate == 8000
        chunks.append(s.data[:, 0])
    src.close()
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    np.testing.assert_allclose(np.concatenate(chunks), pcm / 32768.0)


def test_csv_replay_loops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    np.savetxt(path, np.arange(6).reshape(3, 2), delimiter=",")
    src = open_source(SourceSpec("csv", str(path), {"loop": "true"}))
    rows = [src.read() for _ in range(4)]
    assert [r.data.tolist() for r in rows if r] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert [r.seq for r in rows if r] == [0, 1, 2, 3]


def test_line_source_skips_garbled_lines(tmp_path: Path) -> None:
    path = tmp_path / "serial.txt"
    path.write_text("1.0, 2.0\n\nnoise\n3 4\n")
    src = open_source(SourceSpec("lines", str(path)))
    assert src.read().data.tolist() == [1.0, 2.0]  # type: ignore[union-attr]
    assert src.read().data.tolist() == [3.0, 4.0]  # type: ignore[union-attr]
    assert src.read() is None


def test_video_file_frames_and_missing_camera(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (40, 30))
    for i in range(3):
        writer.write(np.full((30, 40, 3), 60 * i, np.uint8))
    writer.release()
    src = open_source(SourceSpec("video", str(path)))
    frames = []
    while (s := src.read()) is not None:
        frames.append(s)
    assert [f.data.shape for f in frames] == [(30, 40, 3)] * 3
    with pytest.raises(SourceError, match="cannot be opened"):
        open_source(SourceSpec("camera", "/dev/video-missing-99"))
    with pytest.raises(SourceError, match="cannot be opened"):
        open_source(SourceSpec("wav", str(tmp_path / "none.wav")))


def test_synthetic_source_is_seeded_and_finite() -> None:
    a = open_source(SourceSpec("synthetic", "", {"shape": "4,4,3", "count": "2", "seed": "1"}))
    b = open_source(SourceSpec("synthetic", "", {"shape": "4,4,3", "count": "2", "seed": "1"}))
    first = a.read()
    assert first is not None and first.kind == "image"
    np.testing.assert_array_equal(first.data, b.read().data)  # type: ignore[union-attr]
    assert a.read() is not None and a.read() is None


def test_serial_line_source_on_a_real_pty_sets_the_baud_rate() -> None:
    import os
    import termios

    master, slave = os.openpty()
    try:
        src = open_source(SourceSpec("lines", os.ttyname(slave), {"baud": "9600"}))
        attrs = termios.tcgetattr(slave)
        assert attrs[4] == attrs[5] == termios.B9600
        os.write(master, b"0.5,1.5,-2\n")
        sample = src.read()
        assert sample is not None and sample.data.tolist() == [0.5, 1.5, -2.0]
        src.close()
        with pytest.raises(SourceError, match="unsupported baud rate 12345"):
            open_source(SourceSpec("lines", os.ttyname(slave), {"baud": "12345"}))
    finally:
        os.close(master)
        os.close(slave)


def test_the_agent_does_not_load_opencv_until_an_image_needs_it() -> None:
    import subprocess
    import sys

    code = "import sys, agent.service; assert 'cv2' not in sys.modules and 'sounddevice' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
