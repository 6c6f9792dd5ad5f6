"""Real third-party models as tenants of a real agent, fed by media written in the test.

MediaPipe's short-range face detector (a TFLite file from the mediapipe wheel, run by
LiteRT) watches a video written by OpenCV in which a face is drawn at a known place:
the agent letterboxes each frame, runs the model, decodes its 896 anchor boxes with
non-maximum suppression and publishes labelled detections, which must lie where the
face was drawn; its raw tensors must equal LiteRT's on the same prepared input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import inference_pb2

from agent.preprocess import letterbox
from tests.support.agent_calls import Stream, outputs
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.media import face_frame, write_video

cv2 = pytest.importorskip("cv2")
litert = pytest.importorskip("ai_edge_litert.interpreter")
pytestmark = pytest.mark.slow

TOKEN = "faces-token-" + "y" * 16
# (cx, cy, r) in a 320x240 frame, then a frame with no face.
FACES: list[tuple[int, int, int] | None] = [(200, 110, 60), (90, 140, 50), None]

FACE_TENANT = f"""
[[tenants]]
id = "faces"
model = "face_detection"
token = "{TOKEN}"
queue = 64
rate_hz = 20
[tenants.source]
kind = "video"
uri = "{{video}}"
loop = true
[tenants.preprocess]
resize = [128, 128]
fit = "letterbox"
color = "rgb"
scale = {1 / 127.5!r}
mean = [1.0]
[tenants.postprocess]
kind = "ssd"
output = "classificators"
boxes_output = "regressors"
strides = [8, 16, 16, 16]
threshold = 0.5
labels = ["face"]
raw = true
"""


def direct(model: Path, frame: np.ndarray) -> dict[str, np.ndarray]:
    """The file run directly in LiteRT on the frame prepared as the tenant declares."""
    interpreter = litert.Interpreter(model_path=str(model))
    interpreter.allocate_tensors()
    boxed, _ = letterbox(frame, 128, 128)
    x = (boxed[:, :, ::-1].astype(np.float64) / 127.5 - 1.0)[None].astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def test_face_detector_tenant_finds_the_drawn_face_and_matches_litert(
    make_agent: Callable[..., AgentProcess],
    make_peer: Callable[[str], Peer],
    real_models: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    model = real_models("face_detection_short_range")
    frames = write_video(tmp_path / "hall.avi", [face_frame(320, 240, f) for f in FACES])
    agent = make_agent(telemetry_interval_s=1.0)
    with agent.config.open("a") as f:
        f.write(FACE_TENANT.format(video=tmp_path / "hall.avi"))
    peer = make_peer(agent.device_id)
    a = peer.assignment(peer.add_artifact(model, fmt="tflite"), "1", name="face_detection", tenant="faces")
    a.format, a.runtime = "tflite", "litert"
    peer.publish_desired(1, a)
    agent.start()
    agent.wait_ready()
    peer.wait_active(a.artifact_digest, tenant="faces", timeout=60)

    results: list[inference_pb2.Result] = Stream(agent, "faces", TOKEN).collect(2 * len(FACES), timeout=60)
    worst = 0.0
    for r in results:
        index = r.seq % len(FACES)
        want = direct(model, frames[index])
        got = outputs(r)
        for name in ("regressors", "classificators"):
            worst = max(worst, float(np.abs(got[name] - want[name]).max()))
        face = FACES[index]
        if face is None:
            assert list(r.detections) == [], f"frame {index} has no face: {r.detections}"
            continue
        assert len(r.detections) == 1, f"frame {index}: {r.detections}"
        d = r.detections[0]
        cx, cy, radius = face
        assert d.label == "face" and d.score > 0.5
        # The box centre is within a third of the face's radius of where it was drawn.
        assert abs((d.x0 + d.x1) / 2 * 320 - cx) < radius / 3
        assert abs((d.y0 + d.y1) / 2 * 240 - cy) < radius / 2
    print(f"face detection tenant vs LiteRT direct: max abs difference {worst:.2e}")
    assert worst < 1e-4
