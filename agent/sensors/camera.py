"""Cameras and video through OpenCV's VideoCapture: a V4L2 device, a video file or an RTSP URL."""

from __future__ import annotations

from typing import Any

from agent.errors import SourceError
from agent.sensors.base import Sample, now_ms
from agent.tenants import SourceSpec


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError("a camera or video source needs OpenCV: pip install 'edgefleet[sensors]'") from None
    return cv2


class CameraSource:
    def __init__(self, spec: SourceSpec) -> None:
        cv2 = self._cv2 = _cv2()
        self.spec = spec
        uri = spec.uri
        if uri.isdigit():
            self._cap = cv2.VideoCapture(int(uri), cv2.CAP_V4L2)
        elif uri.startswith("/dev/video"):
            self._cap = cv2.VideoCapture(uri, cv2.CAP_V4L2)
        else:
            self._cap = cv2.VideoCapture(uri)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"{spec.kind} {uri!r} cannot be opened")
        if spec.kind == "camera":
            for key, prop in (("width", cv2.CAP_PROP_FRAME_WIDTH), ("height", cv2.CAP_PROP_FRAME_HEIGHT),
                              ("fps", cv2.CAP_PROP_FPS)):  # fmt: skip
                if key in spec.options:
                    self._cap.set(prop, spec.number(key, 0))
        self._seq = 0

    def read(self) -> Sample | None:
        ok, frame = self._cap.read()
        if not ok and self.spec.kind == "video" and self.spec.flag("loop") and self._seq:
            self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read()
        if not ok:
            if self.spec.kind == "video":
                return None
            raise SourceError(f"camera {self.spec.uri!r} stopped delivering frames")
        sample = Sample("image", frame, self._seq, now_ms())
        self._seq += 1
        return sample

    def close(self) -> None:
        self._cap.release()
