"""Real third-party models, taken out of the PyPI wheels their authors publish.

Nothing here is built or trained by us: MediaPipe's TFLite task models, silero-vad's
ONNX voice detector and RapidOCR's PaddleOCR exports, each fetched with
``pip download --no-deps`` (the ordinary client, so a mirror or proxy configured for
pip applies) and extracted into a cache folder that later runs reuse without any
download. Each file is pinned by its sha256: a cached file that differs is fetched again.

The cache is ``$EDGEFLEET_TEST_MODELS`` or ``~/.cache/edgefleet-test-models``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "EDGEFLEET_TEST_MODELS"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel, for the platform the suite runs on (Linux x86_64, CPython 3.11)."""

    requirement: str
    # pip's --platform tags; empty for a pure-Python wheel.
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class RealModel:
    name: str
    wheel: Wheel
    member: str  # the file's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


# MediaPipe stopped shipping its .tflite files inside the wheel after 0.10.14.
MEDIAPIPE = Wheel("mediapipe==0.10.14", ("manylinux_2_17_x86_64", "manylinux2014_x86_64"))
SILERO = Wheel("silero-vad==6.2.3")
RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4")

CORPUS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "face_detection_short_range",
            MEDIAPIPE,
            "mediapipe/modules/face_detection/face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        ),
        RealModel(
            "selfie_segmentation",
            MEDIAPIPE,
            "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
            "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        ),
        RealModel(
            "silero_vad",
            SILERO,
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        ),
        RealModel(
            "ppocr_det",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        ),
        RealModel(
            "ppocr_cls",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        ),
    )
}


class CorpusUnavailable(RuntimeError):
    """pip could not fetch a wheel (no index reachable, or the pinned release is gone)."""


def default_cache() -> Path:
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path.home() / ".cache" / "edgefleet-test-models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelCorpus:
    """The corpus's files in ``cache``; ``pip`` is the command prefix that runs pip."""

    def __init__(self, cache: Path | None = None, pip: Sequence[str] | None = None) -> None:
        self.cache = cache or default_cache()
        self.pip = list(pip) if pip is not None else [sys.executable, "-m", "pip"]
        self.downloads = 0

    def path(self, name: str) -> Path:
        """The model file, fetched (with every other corpus file of its wheel) when not cached."""
        model = CORPUS[name]
        target = self.cache / model.filename
        if self._valid(target, model):
            return target
        self._fetch(model.wheel)
        if not self._valid(target, model):
            raise CorpusUnavailable(
                f"{model.wheel.requirement} has no {model.member} with sha256 {model.sha256}"
            )
        return target

    @staticmethod
    def _valid(path: Path, model: RealModel) -> bool:
        return path.is_file() and _sha256(path) == model.sha256

    def _fetch(self, wheel: Wheel) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".download-") as tmp:
            command = [*self.pip, "download", "--no-deps", "--only-binary=:all:", "--dest", tmp]
            if wheel.platforms:
                command += ["--python-version", "3.11", "--implementation", "cp"]
                for platform in wheel.platforms:
                    command += ["--platform", platform]
            command.append(wheel.requirement)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CorpusUnavailable(f"pip download {wheel.requirement}: {exc}") from None
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise CorpusUnavailable(f"pip download {wheel.requirement} failed: {' | '.join(tail)}")
            self.downloads += 1
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise CorpusUnavailable(f"pip download {wheel.requirement} gave {[w.name for w in wheels]}")
            self._extract(wheels[0], [m for m in CORPUS.values() if m.wheel == wheel], Path(tmp))

    def _extract(self, wheel_path: Path, models: list[RealModel], tmp: Path) -> None:
        with zipfile.ZipFile(wheel_path) as wheel:
            names = set(wheel.namelist())
            for model in models:
                if model.member not in names:
                    continue
                staged = tmp / model.filename
                with wheel.open(model.member) as src, staged.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                # Renamed into place whole: a run stopped mid-copy leaves no half file behind.
                os.replace(staged, self.cache / model.filename)
