"""A device joins as an operator onboards one: `edgefleet devices register --bundle` on the
operator's side, `edgefleet-agent install --bundle` on the device (as root, into a temporary
root), and the agent with the installed config comes online at the controller, saying its
profile's accelerator is not there on this CPU-only machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests.support.agent_process import AgentProcess
from tests.support.localfleet import BIN, Controller
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
JETSON = "jetson-orin-nano-8gb"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="installs users and files: needs root and useradd",
)


def device_root(folder: Path) -> Path:
    root = folder / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    return root


@pytest.mark.slow
def test_a_device_joins_from_its_bundle(
    controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    controller.cli("profiles", "register", str(REPO / "firmware_profiles" / f"{JETSON}.toml"))
    data_dir = tmp_path / "device-data"
    socket = Path(tempfile.mkdtemp(prefix="efo-")) / "s.sock"
    bundle = tmp_path / "cam-j.bundle"
    controller.cli(
        "devices", "register", "cam-j", "--profile", JETSON, "--bundle", str(bundle),
        "--agent-data-dir", str(data_dir), "--agent-socket", str(socket),
    )  # fmt: skip
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600

    root = device_root(tmp_path)
    done = subprocess.run(
        [str(BIN / "edgefleet-agent"), "install", "--bundle", str(bundle), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    installed = root / "etc/edgefleet/agent.toml"
    config = tomllib.loads(installed.read_text())
    assert config["device_id"] == "cam-j"
    assert config["accelerator"] == {"runtime": "onnxruntime-tensorrt"}
    assert config["pool"] == {"memory_budget_mb": 4096.0}
    assert config["api"] == {"socket_group": "edgefleet-apps"}
    pinned = controller.api("GET", "/v1/signing-key").json()["public_key"]
    assert config["security"]["controller_public_key"] == pinned

    # This machine is not the device: it has no edgefleet-apps group, which the install made in
    # the device's root, so the agent here runs the installed config without handing its socket over.
    here = tmp_path / "agent.toml"
    here.write_text(installed.read_text().replace('[api]\nsocket_group = "edgefleet-apps"\n', ""))
    agent = AgentProcess("cam-j", here, data_dir, socket).start()
    agents.append(agent)

    def online_with_condition() -> dict[str, object] | None:
        device = controller.api("GET", "/v1/devices/cam-j").json()
        reported = device.get("reported") or {}
        kinds = [c["kind"] for c in reported.get("conditions", [])]
        return device if device.get("online") and kinds == ["accelerator_unavailable"] else None

    device = wait_until(online_with_condition, 60, "cam-j online, reporting its accelerator missing")
    message = device["reported"]["conditions"][0]["message"]  # type: ignore[index]
    assert message.startswith("accelerator unavailable: onnxruntime-tensorrt: TensorrtExecutionProvider")

    # With a certificate: the device's key, its certificate and the broker's CA travel in the bundle.
    tls_bundle = tmp_path / "cam-t.bundle"
    controller.cli(
        "devices", "register", "cam-t", "--bundle", str(tls_bundle), "--issue-cert",
        "--broker-ca", str(controller.data_dir / "ca" / "ca.crt"),
    )  # fmt: skip
    tls_root = device_root(tmp_path / "tls")
    done = subprocess.run(
        [str(BIN / "edgefleet-agent"), "install", "--bundle", str(tls_bundle), "--root", str(tls_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    etc = tls_root / "etc/edgefleet"
    mqtt = tomllib.loads((etc / "agent.toml").read_text())["mqtt"]
    assert (mqtt["tls_cert_file"], mqtt["tls_key_file"], mqtt["tls_ca_file"]) == (
        "cam-t.crt",
        "cam-t.key",
        "broker-ca.crt",
    )
    assert (etc / "broker-ca.crt").read_bytes() == (controller.data_dir / "ca" / "ca.crt").read_bytes()
    assert stat.S_IMODE((etc / "cam-t.key").stat().st_mode) == 0o640
