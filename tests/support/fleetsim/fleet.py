"""The parent's side: simulator processes started, steered and summed up.

:class:`SimFleet` splits the devices over ``processes`` simulator processes
(:mod:`tests.support.fleetsim.worker`); :class:`BareSubscribers` does the same for bare
paho subscribers (:mod:`tests.support.fleetsim.bare`). Both answer ``stats()`` with the
sum over their processes and expose the processes' pids (for CPU figures).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

from tests.support.fleetsim import bare, worker
from tests.support.fleetsim.bare import BareStats
from tests.support.fleetsim.device import DeviceLogin, SimSettings
from tests.support.fleetsim.worker import WorkerStats

S = TypeVar("S", WorkerStats, BareStats)
# Spawned, not forked: the parent may hold threads (HTTP clients, a controller's pipes).
_CONTEXT = mp.get_context("spawn")


class ProcessGroup(Generic[S]):
    def __init__(self, empty: Callable[[], S]) -> None:
        self._empty = empty
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []

    def spawn(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        parent, child = _CONTEXT.Pipe()
        proc = _CONTEXT.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        self.pipes.append(parent)

    def wait_ready(self, timeout: float) -> S:
        total = self._empty()
        for proc, pipe in zip(self.procs, self.pipes, strict=True):
            if not pipe.poll(timeout):
                raise TimeoutError(f"simulator process {proc.pid} not ready after {timeout} s")
            answer = pipe.recv()
            if answer[0] != "ready":
                raise RuntimeError(f"simulator process {proc.pid} failed: {answer[1]}")
            total = total.add(answer[1])
        return total

    def call(self, *command: Any, timeout: float = 120.0) -> list[Any]:
        """Send ``command`` to every process and gather their answers, within ``timeout`` in all."""
        for pipe in self.pipes:
            pipe.send(command)
        answers = []
        deadline = time.monotonic() + timeout
        for proc, pipe in zip(self.procs, self.pipes, strict=True):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"simulator process {proc.pid} did not answer {command!r} in {timeout} s")
            answer = pipe.recv()
            if isinstance(answer, Exception) or (isinstance(answer, tuple) and answer[0] == "failed"):
                raise RuntimeError(f"simulator process {proc.pid}: {answer!r}")
            answers.append(answer)
        return answers

    def stats(self) -> S:
        total = self._empty()
        for answer in self.call("stats"):
            total = total.add(answer)
        return total

    def wait(self, check: Callable[[S], bool], timeout: float, what: str, interval: float = 0.5) -> S:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if check(stats):
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {stats})")
            time.sleep(interval)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> S | None:
        total: S | None = None
        try:
            total = self._empty()
            for answer in self.call("stop", timeout=60):
                total = total.add(answer)
        except (OSError, EOFError, RuntimeError, TimeoutError):
            total = None
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return total


class SimFleet(ProcessGroup[WorkerStats]):
    """Simulated devices (the agent's own protocol code) in ``processes`` processes."""

    def __init__(
        self,
        logins: Sequence[DeviceLogin],
        settings: SimSettings,
        processes: int = 4,
        connect_rate: float = 400.0,
        log_dir: Path | None = None,
        nice: int = 0,
    ) -> None:
        super().__init__(WorkerStats)
        self.nice = nice
        self.logins = list(logins)
        self.settings = settings
        self.processes = max(1, min(processes, len(self.logins)))
        self.connect_rate = connect_rate
        self.log_dir = log_dir or settings.state_dir

    def start(self, timeout: float = 300.0) -> SimFleet:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.processes):
            share = self.logins[i :: self.processes]
            log_file = self.log_dir / f"fleetsim-{i}.log"
            rate = self.connect_rate / self.processes
            self.spawn(worker.main, (share, self.settings, i, rate, log_file, self.nice))
        self.wait_ready(timeout)
        self.call("start")
        return self

    def wait_connected(self, timeout: float) -> WorkerStats:
        return self.wait(
            lambda s: s.connected == len(self.logins), timeout, "every simulated device connected"
        )

    def wait_active(self, digest: str, timeout: float, count: int | None = None) -> WorkerStats:
        want = len(self.logins) if count is None else count
        return self.wait(lambda s: s.active[digest] >= want, timeout, f"{want} devices serving {digest[:12]}")

    def hold(self, held: bool) -> None:
        self.call("hold", held)

    def offline(self, device_ids: Sequence[str]) -> None:
        """These devices say offline and disconnect, as an agent that stops."""
        self.call("offline", list(device_ids))

    def online(self, device_ids: Sequence[str]) -> None:
        self.call("online", list(device_ids))


class BareSubscribers(ProcessGroup[BareStats]):
    """``len(logins)`` bare paho subscribers to ``topic``, spread over ``processes`` processes."""

    def __init__(
        self,
        logins: Sequence[tuple[str, str]],
        host: str,
        port: int,
        topic: str,
        processes: int = 1,
        decode: bool = False,
        connect_rate: float = 1000.0,
    ) -> None:
        super().__init__(BareStats)
        self.logins = list(logins)
        self.processes = max(1, min(processes, len(self.logins)))
        self.args = (host, port, topic, decode, connect_rate / self.processes)

    def start(self, timeout: float = 300.0) -> BareSubscribers:
        for i in range(self.processes):
            self.spawn(bare.main, (self.logins[i :: self.processes], *self.args))
        self.wait_ready(timeout)
        self.wait(lambda s: s.subscribed == len(self.logins), timeout, "every bare subscriber subscribed")
        return self
