"""The README's demo (examples/demo.py, what scripts/demo.sh runs): its devices classify the
digits they are shown correctly, and it ends with the console's address, serving it
until it is stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

# Outside pytest-xdist workers (scripts/test.sh runs them on their own).
pytestmark = pytest.mark.serial


@pytest.mark.slow
def test_the_demo_classifies_its_digits_and_ends_with_the_console(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--workdir", str(tmp_path / "demo")],
        # Never the runner's stdin: under pytest-xdist it is the worker's channel to the runner.
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    console = threading.Event()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "web console:" in line:
                console.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert console.wait(240), "".join(lines)[-4000:]
        line = next(line for line in lines if "web console:" in line)
        found = re.search(r"web console: (http://\S+/ui) \(log in with the admin token (\S+)\)", line)
        assert found, line
        page = httpx.get(found.group(1), timeout=30, follow_redirects=True)
        assert page.status_code == 200 and "<html" in page.text.lower(), (page.status_code, page.text[:500])
        # It keeps the fleet up for the console until it is told to stop.
        assert demo.poll() is None
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0, "".join(lines)[-4000:]
    finally:
        demo.kill()
        reader.join(timeout=10)
    answers = [re.search(r"predicted (\[[\d, ]+\]), true (\[[\d, ]+\])", line) for line in lines]
    shown = [(m.group(1), m.group(2)) for m in answers if m]
    assert len(shown) == 3 and all(predicted == true for predicted, true in shown), shown
    accuracy = next(line for line in lines if "held-out digits:" in line)
    assert float(re.search(r"([\d.]+)% correct", accuracy).group(1)) > 90  # type: ignore[union-attr]
