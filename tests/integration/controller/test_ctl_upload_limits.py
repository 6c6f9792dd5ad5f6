"""Hostile uploads against a real controller process: its memory, its disk, its limits."""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from tests.support.broker import Broker
from tests.support.localfleet import Controller
from tests.support.models import big_onnx_failing_late, dense_of_size, digits_classifier, expanding_onnx
from tests.support.waiting import wait_until

MiB = 1024 * 1024


def _controller(broker: Broker, tmp_path: Path, **settings: Any) -> Controller:
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    c.init()
    if settings:
        path = c.data_dir / "controller.toml"
        doc = tomllib.loads(path.read_text()) | settings
        path.write_text(tomli_w.dumps(doc))
    return c


@pytest.fixture
def start(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    """Starts the controller process with these settings in controller.toml."""
    started: list[Controller] = []

    def run(**settings: Any) -> Controller:
        c = _controller(broker, tmp_path, **settings).start()
        started.append(c)
        return c

    try:
        yield run
    finally:
        for c in started:
            c.stop()


class PeakRss:
    """Samples a process's resident memory every few milliseconds while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _upload(c: Controller, path: Path, name: str = "m", version: str = "1") -> Any:
    with path.open("rb") as f:
        return c.api(
            "POST",
            f"/v1/models/{name}/versions",
            data={"version": version},
            files={"file": (path.name, f, "application/octet-stream")},
        )


def _leftovers(c: Controller) -> list[Path]:
    return [p for p in (c.data_dir / "artifacts").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_200_mb_upload_is_checked_without_the_controller_holding_it(
    start: Callable[..., Controller], tmp_path: Path
) -> None:
    limited = start()
    # Refused by the checker only after it has read every byte, so nothing after the check
    # (the optimizer measuring an accepted model) can blur what the check itself costs.
    model = big_onnx_failing_late(tmp_path / "big.onnx", 200)
    assert limited.proc is not None
    with PeakRss(limited.proc.pid) as rss:
        response = _upload(limited, model)
    assert response.status_code == 422, response.text
    assert "nowhere" in response.json()["detail"]
    assert rss.growth < 64 * MiB, f"controller RSS grew by {rss.growth / MiB:.0f} MiB"
    assert _leftovers(limited) == []


def test_a_tiny_file_that_expands_on_load_is_refused_before_any_runtime_loads_it(
    start: Callable[..., Controller], tmp_path: Path
) -> None:
    limited = start()
    bomb = expanding_onnx(tmp_path / "bomb.onnx", 256 * MiB)  # 1 GiB of float32
    assert bomb.stat().st_size < 300
    assert limited.proc is not None
    with PeakRss(limited.proc.pid) as rss:
        response = _upload(limited, bomb)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "ConstantOfShape" in detail and "1.0 GiB" in detail and "max_model_memory_bytes" in detail
    assert rss.growth < 64 * MiB, f"controller RSS grew by {rss.growth / MiB:.0f} MiB"
    assert limited.api("GET", "/v1/models").json() == []
    assert _leftovers(limited) == []


def test_expansion_shape_inference_cannot_size_is_refused_by_the_checker_limit(
    start: Callable[..., Controller], tmp_path: Path
) -> None:
    limited = start(max_model_memory_bytes=256 * MiB)
    hidden = expanding_onnx(tmp_path / "hidden.onnx", 256 * MiB, hidden=True)  # 1 GiB when run
    assert limited.proc is not None
    with PeakRss(limited.proc.pid) as rss:
        response = _upload(limited, hidden)
    assert response.status_code == 422, response.text
    assert "256.0 MiB" in response.json()["detail"]
    assert rss.growth < 64 * MiB
    # A model that fits is still accepted under the same limit.
    fits = _upload(limited, digits_classifier(tmp_path / "digits.onnx").path, version="2")
    assert fits.status_code == 201, fits.text


def test_weights_over_the_memory_limit_are_refused_naming_the_biggest(
    start: Callable[..., Controller], tmp_path: Path
) -> None:
    limited = start(max_model_memory_bytes=32 * MiB)
    response = _upload(limited, dense_of_size(tmp_path / "dense.onnx", 48))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "initializer 'w'" in detail and "32.0 MiB" in detail


@pytest.mark.slow
def test_partial_uploads_left_by_a_killed_controller_are_removed_at_start(
    start: Callable[..., Controller], tmp_path: Path
) -> None:
    limited = start()
    model = dense_of_size(tmp_path / "dense.onnx", 150)
    outcome: list[Any] = []
    sender = threading.Thread(target=lambda: outcome.append(_try_upload(limited, model)), daemon=True)
    sender.start()
    # The staged copy exists from the moment the body is in until the check ends.
    wait_until(
        lambda: [p for p in _leftovers(limited) if _size(p) > MiB],
        60,
        "the upload to be staged",
        interval=0.002,
    )
    assert limited.proc is not None
    limited.proc.send_signal(signal.SIGKILL)
    limited.proc.wait()
    sender.join(30)
    staged = [p for p in _leftovers(limited) if p.name.startswith(".upload-")]
    assert staged, "the kill left no partial upload to clean"
    limited.start()
    assert _leftovers(limited) == []
    assert "partial uploads removed count=" in limited.log_file.read_text()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _try_upload(c: Controller, path: Path) -> Any:
    try:
        return _upload(c, path)
    except Exception as exc:  # the connection dies with the controller
        return exc


def test_a_body_without_content_length_is_cut_off_at_the_limit(start: Callable[..., Controller]) -> None:
    limited = start(max_upload_bytes=8 * MiB)
    sent, status, body = _stream_chunked_upload(limited, total=200 * MiB)
    assert status == 413, body
    assert b"8388608 bytes" in body
    # Refused as it streamed: at most the limit plus what the sockets' buffers held.
    assert sent < 8 * MiB + 24 * MiB, f"{sent / MiB:.0f} MiB were sent before the 413"
    assert _leftovers(limited) == []
    assert limited.api("GET", "/v1/models").status_code == 200


def _complete(response: bytes) -> bool:
    """Whether ``response`` holds the status line, the headers and the whole body."""
    head, found, body = response.partition(b"\r\n\r\n")
    if not found:
        return False
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return len(body) >= length


def _stream_chunked_upload(c: Controller, total: int) -> tuple[int, int, bytes]:
    """Send a multipart upload with Transfer-Encoding: chunked (no Content-Length) until the
    server answers; returns (bytes sent, status, response body)."""
    boundary = "edgefleet-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1/models/m/versions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {c.token}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    piece = b"\0" * (256 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as sock:
        sock.sendall(request)
        chunks = [head] + [piece] * (total // len(piece))
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = b""
        deadline = time.monotonic() + 30
        while not _complete(response) and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            response += data
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
    return sent, status, rest
