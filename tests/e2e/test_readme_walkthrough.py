"""The README's "Using it" walkthrough, run as written, so the README cannot drift from the product.

The ``sh`` blocks between ``<!-- walkthrough -->`` and ``<!-- /walkthrough -->`` run in
order in one bash, from the repository's folder as the README says, with ``set -euo
pipefail`` added: every command must succeed. Only the environment variables the README
reads for its folder and ports are set (a temporary folder, free ports), so the processes
are started exactly the way the README starts them (Mosquitto with the command init
prints, the controller, the agents and the retraining job in the background). The
commands shown outside the walkthrough must at least parse.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.cli import build_parser
from tests.support.broker import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)

# Outside pytest-xdist workers (scripts/test.sh runs them on their own).
pytestmark = pytest.mark.serial


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.index(end)]


def walkthrough() -> list[str]:
    text = section(README.read_text(), "<!-- walkthrough -->", "<!-- /walkthrough -->")
    return [body for lang, body in BLOCK.findall(text) if lang == "sh"]


def command_lines(block: str) -> list[str]:
    """Each command of a block, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_the_walkthrough_blocks_and_the_commands_around_them_are_well_formed() -> None:
    blocks = walkthrough()
    assert len(blocks) >= 6 and blocks[0].startswith(". .venv/bin/activate")
    using = section(README.read_text(), "## Using it", "## Benchmarks")
    # The install line names extras the project has.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    install = re.search(r'pip install -e "\.\[([\w,]+)\]"', using)
    assert install is not None and set(install.group(1).split(",")) <= set(extras)
    assert "pip install edgefleet" not in README.read_text(), "EdgeFleet is not on PyPI"
    parser = build_parser()
    shown = [body for lang, body in BLOCK.findall(using) if lang == "text"]
    lines = [line for body in shown for line in command_lines(body) if line.startswith("edgefleet ")]
    assert len(lines) > 10
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"the README shows a command the CLI refuses: {line}")


@pytest.fixture
def short_home() -> Iterator[Path]:
    """The walkthrough's EF_HOME, short: the agent's socket path in it must fit a Unix socket's
    107 bytes, which pytest's own folders (``/tmp/pytest-of-root/pytest-123/test_the_readme_.../``)
    outgrow once their run number has a few digits."""
    root = Path(tempfile.mkdtemp(prefix="ef-walk-"))
    try:
        yield root / "walkthrough"  # not made yet, as the README's reader's folder is not
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(480)  # 75 s on two cores shared with other work (load 6); 3 min at load 18
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, short_home: Path) -> None:
    home = short_home
    script = "set -euo pipefail\n" + "\n".join(walkthrough())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET_", "EF_", "VIRTUAL_ENV"))}
    env |= {
        "EF_HOME": str(home),
        "EF_BROKER_PORT": str(free_port()),
        "EF_PORT": str(free_port()),
        "EF_JOB_PORT": str(free_port()),
        "COLUMNS": "160",
        # The activated .venv is the one running the tests.
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
    }
    log = tmp_path / "walkthrough.log"
    with log.open("w") as out:
        bash = subprocess.Popen(
            ["bash", "-c", script],
            cwd=REPO,
            env=env,
            # Never the runner's stdin: under pytest-xdist it is the worker's channel to the runner.
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = bash.wait(timeout=420)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # Whatever the script left running when it stopped early: its background jobs
            # share its process group; the broker daemon has its pid file.
            for pid in (bash.pid, *_broker_pid(home)):
                with contextlib.suppress(ProcessLookupError):
                    (os.killpg if pid == bash.pid else os.kill)(pid, signal.SIGTERM)
            bash.wait(timeout=30)
    output = log.read_text()
    assert code == 0, f"the walkthrough stopped (exit {code}):\n{output[-6000:]}"
    # What the README says happens did: the int8 variant, both rollouts, the closed loop.
    assert "onnx-int8-static" in output and "ready" in output
    assert re.search(r"labelled \d+ samples captured on cam-(north|south)", output), output[-3000:]
    assert re.search(r"digits-drift: 1\.1\.0\.r\w+ registered; rollout", output), output[-3000:]


def _broker_pid(home: Path) -> list[int]:
    pid_file = home / "controller" / "mosquitto" / "mosquitto.pid"
    try:
        return [int(pid_file.read_text())]
    except (OSError, ValueError):
        return []
