"""Resident memory of the agent process, beside bare processes measured in the same run.

Starts mosquitto and a real ``edgefleet-agent`` (``python -m agent.cli run``),
then reads the agent's RSS (psutil):

- idle: connected, serving no model;
- one ONNX model: after a small conv net arrived through the desired state and
  answered a few Infer calls;
- LiteRT-only: a fresh agent serving only a TFLite model (tflite-micro's
  sine_float.tflite) through LiteRT.

Baselines in the same run: a bare Python interpreter; Python with numpy and
onnxruntime imported and the same model loaded in one session, and Python with
LiteRT and the TFLite model (what an app running the model itself would pay).

Run: ``.venv/bin/python bench/agent_memory.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import inference_pb2, inference_pb2_grpc

from tests.broker import REPO, Broker
from tests.integration.agent.peer import Peer, wait_until
from tests.localfleet import to_tensors
from tests.models import sine_float_tflite, small_conv

MB = 1024 * 1024


def rss_of(code: str) -> float:
    """RSS of a fresh interpreter running ``code`` and then waiting to be measured."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nimport sys; print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
    time.sleep(0.5)
    rss = psutil.Process(proc.pid).memory_info().rss / MB
    proc.communicate("", timeout=10)
    return rss


def settle_rss(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return psutil.Process(pid).memory_info().rss / MB


def agent_rss(folder: Path, broker: Broker, model: Path, fmt: str) -> tuple[float, float]:
    """(idle RSS, RSS once ``model`` serves and answered 20 calls) of a fresh agent process."""
    device = f"mem-{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    broker.add_user(device, password)
    data = folder / device
    config = folder / f"{device}.toml"
    socket = folder / f"{device}.sock"
    config.write_text(
        f'device_id = "{device}"\ndata_dir = "{data}"\nsocket = "{socket}"\n'
        f'[mqtt]\nport = {broker.port}\npassword = "{password}"\n'
        # The bench's protocol peer does not sign.
        "[security]\nallow_unsigned = true\n"
    )
    log_path = folder / f"{device}.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
    peer = Peer(broker, device)
    try:
        wait_until(lambda: b"agent ready" in log_path.read_bytes(), 30, "agent ready")
        idle = settle_rss(agent.pid)
        digest = peer.add_artifact(model, fmt=fmt)
        assignment = peer.assignment(digest, "1", name="m")
        assignment.format, assignment.runtime = fmt, "litert" if fmt == "tflite" else "onnxruntime"
        peer.publish_desired(1, assignment)
        peer.wait_active(digest)
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            spec = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models[0].inputs[0]
            x = np.zeros([d if d > 0 else 1 for d in spec.shape], np.dtype(spec.dtype))
            for _ in range(20):
                stub.Infer(inference_pb2.InferRequest(inputs=to_tensors({spec.name: x})), timeout=10)
        return idle, settle_rss(agent.pid)
    finally:
        peer.close()
        agent.terminate()
        agent.wait(20)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="efm-") as tmp:
        folder = Path(tmp)
        model = small_conv(folder / "conv.onnx")
        bare = rss_of("pass")
        raw = rss_of(
            "import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {'image': np.zeros((1, 3, 32, 32), np.float32)})"
        )
        tflite = sine_float_tflite()
        raw_litert = rss_of(
            "import numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\n"
            f"i = Interpreter(model_path={str(tflite)!r}); i.allocate_tensors(); i.invoke()"
        )
        broker = Broker(folder / "mosquitto").start()
        try:
            idle, loaded = agent_rss(folder, broker, model, "onnx")
            _, litert = agent_rss(folder, broker, tflite, "tflite")
        finally:
            broker.stop()
    print("agent RSS (psutil), one run")
    print(f"    bare python                           {bare:7.1f} MB")
    print(f"    python + onnxruntime + conv (raw)     {raw:7.1f} MB")
    print(f"    python + LiteRT + sine model (raw)    {raw_litert:7.1f} MB")
    print(
        f"    agent idle, no model                  {idle:7.1f} MB   ({idle - bare:+.1f} MB over bare python)"
    )
    print(
        f"    agent, one ONNX model, after Infer    {loaded:7.1f} MB   ratio to raw onnxruntime {loaded / raw:.2f}"
    )
    print(
        f"    agent, LiteRT model only, after Infer {litert:7.1f} MB   ratio to raw LiteRT {litert / raw_litert:.2f}"
    )
    print("    (agent.runtime imports onnxruntime in every agent, LiteRT-only ones included)")


if __name__ == "__main__":
    main()
