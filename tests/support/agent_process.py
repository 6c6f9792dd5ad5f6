"""A real agent process for the agent's integration tests: its config, start, readiness and kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from edgefleet_proto import inference_pb2_grpc

from tests.support.broker import REPO
from tests.support.waiting import wait_until


@dataclass
class AgentProcess:
    device_id: str
    config: Path
    data_dir: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    def start(self) -> AgentProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"agent exited:\n{self.output()}"
            return self.output().count("agent ready") > self.readies

        wait_until(ready, timeout, "agent ready")
        self.readies += 1

    readies: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
