"""A real agent process, as the tests start it: the installed ``edgefleet-agent run`` with a
config, its log, readiness, stop, kill and local API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.tensors import from_arrays
from tests.support.waiting import wait_until

AGENT = Path(sys.executable).parent / "edgefleet-agent"


@dataclass
class AgentProcess:
    device_id: str
    config: Path
    data_dir: Path
    socket: Path
    # Where its output goes; beside its data folder unless given.
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    channels: list[grpc.Channel] = field(default_factory=list)
    # "agent ready" lines seen so far: a restart waits for one more.
    readies: int = 0

    def __post_init__(self) -> None:
        if self.log_file is None:
            self.log_file = self.data_dir.parent / f"{self.device_id}.log"

    @property
    def log_path(self) -> Path:
        assert self.log_file is not None
        return self.log_file

    def start(self) -> AgentProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(AGENT), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.alive(), f"agent exited:\n{self.output()}"
            return self.output().count("agent ready") > self.readies

        wait_until(ready, timeout, "agent ready")
        self.readies += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """Everything the agent wrote."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log(self, tail: int = 20000) -> str:
        """The end of what the agent wrote, for a failure message."""
        return self.output()[-tail:]

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as systemd stops the service; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within 20 s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(channel)
        return channel

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel())

    def infer(self, inputs: dict[str, np.ndarray], tenant: str = "") -> inference_pb2.InferResponse:
        request = inference_pb2.InferRequest(tenant=tenant, inputs=from_arrays(inputs))
        response: inference_pb2.InferResponse = self.stub().Infer(request, timeout=10)
        return response

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)
