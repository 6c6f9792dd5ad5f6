"""Provisioning bundles, made on the operator's machine by ``edgefleet devices register --bundle``.

A bundle (format in :mod:`edgefleet_proto.bundle`) carries the device's agent.toml (the
broker's address and the device's credentials, the controller's public key it pins,
the settings its profile gives: model memory budget and accelerator), the broker's CA
for a TLS broker, and with ``--issue-cert`` the device's key and certificate. Its
agent.toml is the one a systemd service wants: the inference socket under the
service's runtime folder, handed to the tenant apps' group. On the device,
``edgefleet-agent install --bundle FILE`` checks and installs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet_proto.bundle import AGENT_CONFIG, pack

from controller.files import atomic_write

# What deploy/systemd/edgefleet-agent.service gives the agent: RuntimeDirectory= for the
# socket, and the group its tenant apps join (SupplementaryGroups=).
SERVICE_SOCKET = "/run/edgefleet-agent/inference.sock"
APPS_GROUP = "edgefleet-apps"
BROKER_CA_FILE = "broker-ca.crt"


def profile_settings(doc: Mapping[str, Any]) -> tuple[float, str]:
    """A registered profile's model memory budget (MB) and the runtime of its first accelerator
    (firmware_profiles/ ``[[accelerators]] runtime``); (0, "") for no profile."""
    budget = float(doc.get("memory", {}).get("model_budget_mb", 0.0)) if doc else 0.0
    accelerators = doc.get("accelerators") or [] if doc else []
    runtime = str(accelerators[0].get("runtime", "")) if accelerators else ""
    return budget, runtime


def bundle_bytes(device_id: str, agent_toml: str, folder: Path, tls: Mapping[str, str]) -> bytes:
    """The bundle of agent.toml and the TLS files it names (``tls``: [mqtt] key -> file name in
    ``folder``)."""
    files = {AGENT_CONFIG: agent_toml.encode()}
    secret = {AGENT_CONFIG}
    for key, name in tls.items():
        files[name] = (folder / name).read_bytes()
        if key == "tls_key_file":
            secret.add(name)
    return pack(device_id, files, secret)


def write_bundle(path: Path, data: bytes) -> None:
    # It holds the device's MQTT password (and private key): the operator's eyes only.
    atomic_write(path, data, mode=0o600)
