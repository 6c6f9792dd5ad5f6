"""The wheel built from the repository is what a device installs: every agent package, the contract,
the systemd unit `edgefleet-agent install` writes, Python 3.10, and an agent extra without the
controller's dependencies. Installed on its own (not from this checkout), the agent finds its unit."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.broker import REPO


def build_wheel(out: Path) -> Path:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            ".",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [wheel] = out.glob("edgefleet-*.whl")
    return wheel


def source_packages() -> set[str]:
    found = set()
    for top in ("agent", "controller", "proto/edgefleet_proto"):
        for init in (REPO / top).rglob("__init__.py"):
            package = init.parent.relative_to(REPO).as_posix().removeprefix("proto/")
            found.add(package.replace("/", "."))
    return found


@pytest.mark.slow
def test_the_wheel_carries_every_package_the_unit_and_says_python_3_10(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        unit = archive.read("agent/units/edgefleet-agent.service")
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert source_packages() <= packages
    assert unit == (REPO / "deploy/systemd/edgefleet-agent.service").read_bytes()
    assert metadata["Requires-Python"] == ">=3.10"
    agent_requirements = [r for r in metadata.get_all("Requires-Dist") or [] if 'extra == "agent"' in r]
    assert any(r.startswith("tomli") and 'python_version < "3.11"' in r for r in agent_requirements)
    assert not [r for r in agent_requirements if r.split(">")[0].split("<")[0] in ("fastapi", "sqlite-utils")]

    # Installed by itself, as on a device: the agent's command line and unit come from the wheel.
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    probe = (
        "import agent, agent.install as i; print(agent.__file__); print(i.parse_unit(i.unit_template()).user)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    where, user = shown.stdout.split()
    assert Path(where).is_relative_to(target) and user == "edgefleet"
