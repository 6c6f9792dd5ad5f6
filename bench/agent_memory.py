"""Resident memory of the agent process, beside bare processes measured in the same run.

Starts mosquitto and a real ``edgefleet-agent`` (``python -m agent.cli run``),
then reads the agent's RSS (psutil):

- idle: connected, serving no model;
- one ONNX model: after a small conv net arrived through the desired state and
  answered a few Infer calls;
- LiteRT-only: when agent.runtime has a ``litert`` backend, an agent started
  without onnxruntime loaded is not possible yet (onnxruntime is imported by
  agent.runtime), so this prints the raw LiteRT interpreter process instead.

Baselines in the same run: a bare Python interpreter; Python with numpy and
onnxruntime imported and the same model loaded in one session (what any app
running the model itself would pay).

Run: ``.venv/bin/python bench/agent_memory.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet_proto import inference_pb2, inference_pb2_grpc

from tests.broker import REPO, Broker
from tests.integration.agent.peer import Peer, wait_until
from tests.localfleet import to_tensors
from tests.models import small_conv

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
        broker = Broker(folder / "mosquitto").start()
        try:
            device = f"mem-{uuid.uuid4().hex[:6]}"
            password = uuid.uuid4().hex
            broker.add_user(device, password)
            config = folder / "agent.toml"
            config.write_text(
                f'device_id = "{device}"\ndata_dir = "{folder / "data"}"\nsocket = "{folder / "s.sock"}"\n'
                f'[mqtt]\nport = {broker.port}\npassword = "{password}"\n'
            )
            log = (folder / "agent.log").open("wb")
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
            try:
                wait_until(lambda: b"agent ready" in (folder / "agent.log").read_bytes(), 30, "agent ready")
                peer = Peer(broker, device)
                idle = settle_rss(agent.pid)
                digest = peer.add_artifact(model)
                peer.publish_desired(1, peer.assignment(digest, "1", name="conv"))
                peer.wait_active(digest)
                import grpc

                with grpc.insecure_channel(f"unix:{folder / 's.sock'}") as channel:
                    stub = inference_pb2_grpc.InferenceServiceStub(channel)
                    x = np.zeros((1, 3, 32, 32), np.float32)
                    for _ in range(20):
                        stub.Infer(inference_pb2.InferRequest(inputs=to_tensors({"image": x})), timeout=10)
                loaded = settle_rss(agent.pid)
                peer.close()
            finally:
                agent.terminate()
                agent.wait(20)
                log.close()
        finally:
            broker.stop()
    try:
        litert = rss_of("from ai_edge_litert.interpreter import Interpreter")
        litert_line = f"{litert:7.1f} MB  (raw LiteRT import; the agent has no LiteRT-only mode yet)"
    except (AssertionError, OSError):
        litert_line = "n/a (ai-edge-litert not installed)"
    print("agent RSS (psutil), one run")
    print(f"    bare python                           {bare:7.1f} MB")
    print(f"    python + onnxruntime + model (raw)    {raw:7.1f} MB")
    print(
        f"    agent idle, no model                  {idle:7.1f} MB   ({idle - bare:+.1f} MB over bare python)"
    )
    print(f"    agent, one ONNX model, after Infer    {loaded:7.1f} MB   ratio to raw {loaded / raw:.2f}")
    print(f"    LiteRT-only                           {litert_line}")


if __name__ == "__main__":
    main()
