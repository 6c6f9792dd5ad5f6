"""The operator's commands for profiles, the registry and the signing key, as real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.config import load_config
from tests.support.localfleet import Controller
from tests.support.models import digits_mlp

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"


def test_profiles_registry_and_key_commands(controller: Controller, tmp_path: Path) -> None:
    bad = tmp_path / "raspberry-pi-4-4gb.toml"
    bad.write_text(
        (PROFILES / "raspberry-pi-4-4gb.toml").read_text().replace("ram_mb = 4096", "ram_mb = 512")
    )
    failed = controller.cli("profiles", "register", str(bad), check=False)
    assert isinstance(failed, subprocess.CompletedProcess) and failed.returncode == 1
    assert (
        "raspberry-pi-4-4gb.toml:17: memory.model_budget_mb: 1024 MB is more than the 512 MB of RAM"
        in failed.stderr
    )
    registered = controller.cli("profiles", "register", str(PROFILES / "raspberry-pi-4-4gb.toml"))
    assert registered["id"] == "raspberry-pi-4-4gb"
    assert controller.cli("profiles", "list") == [
        {"id": "raspberry-pi-4-4gb", "name": "Raspberry Pi 4 Model B (4 GB)"}
    ]

    config = tmp_path / "cam.toml"
    creds = controller.cli(
        "devices", "register", "cam", "--profile", "raspberry-pi-4-4gb", "--agent-config", str(config),
        "--agent-data-dir", str(tmp_path / "cam"),
    )  # fmt: skip
    loaded = load_config(config)
    assert loaded.security.controller_public_key == creds["controller_public_key"]
    assert loaded.pool.memory_budget_mb == 1024
    key = controller.cli("signing-key", "show")
    assert key["public_key"] == creds["controller_public_key"] and key["previous_key_id"] == ""

    mlp = digits_mlp(tmp_path / "mlp.onnx")
    controller.cli(
        "models", "upload", str(mlp.path), "--name", "digits", "--version", "1", "--metrics", '{"acc": 0.9}'
    )
    controller.cli(
        "models", "upload", str(mlp.path), "--name", "digits", "--version", "2", "--parent", "1",
        "--metrics", '{"acc": 0.95}', "--code-version", "train.py@2",
    )  # fmt: skip
    assert controller.cli("models", "promote", "digits", "2", "--to", "production")["stage"] == "production"
    assert controller.cli("models", "archive", "digits", "1")["stage"] == "archived"
    diff = controller.cli("models", "compare", "digits", "1", "2")
    assert diff["metrics"]["acc"]["delta"] > 0 and diff["lineage"]["code_version"] == {
        "1": "",
        "2": "train.py@2",
    }
    shown = controller.cli("models", "show", "digits", "2")
    assert shown["lineage"]["parent_version"] == "1" and shown["variants"][0]["variant"] == "onnx-fp32"
    rotated = controller.cli("signing-key", "rotate")
    assert rotated["previous_key_id"] == key["key_id"] != rotated["key_id"]
