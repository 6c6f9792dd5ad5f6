"""Revoking a device, as deployed: Mosquitto's TLS listener checks client certificates against
the controller's CA and its certificate revocation list (crlfile = DATA/ca/crl.pem), devices log
in with certificates from `edgefleet devices register --issue-cert`. `edgefleet devices revoke`
puts every certificate of the device on the list, takes its password off the broker, ends its
session on the broker and ignores what it still sends; the other devices carry on."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, TlsListener
from tests.support.certs import Issued, issue, make_ca
from tests.support.localfleet import Controller
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    pki: Issued
    broker: Broker
    controller: Controller

    def online(self, device_id: str) -> bool:
        return bool(self.controller.api("GET", f"/v1/devices/{device_id}").json()["online"])


def start_fleet(workdir: Path) -> Fleet:
    """Controller first: its CA and revocation list are what the broker checks clients with."""
    pki = make_ca(workdir / "pki", "broker-ca")
    server = issue(pki, workdir / "pki", "broker", "localhost", server=True)
    controller_ca = workdir / "controller" / "ca"
    tls = TlsListener(
        server.cert_file,
        server.key_file,
        controller_ca / "ca.crt",
        require_certificate=True,
        crl_file=controller_ca / "crl.pem",
    )
    broker = Broker(workdir / "mosquitto", tls=tls)
    controller = Controller(workdir / "controller", tls.port, passwd_file=broker.passwd_file)
    controller.init("--mqtt-tls-ca-file", str(pki.cert_file), "--mqtt-client-certificate")
    assert (controller_ca / "crl.pem").exists(), "init writes an empty revocation list"
    broker.start()
    settings_file = controller.data_dir / "controller.toml"
    settings = tomllib.loads(settings_file.read_text())
    settings["broker_reload_command"] = broker.reload_command
    settings_file.write_text(tomli_w.dumps(settings))
    controller.start()
    return Fleet(pki, broker, controller)


def certified_agent(fleet: Fleet, workdir: Path, device_id: str) -> AgentProcess:
    config = workdir / f"{device_id}.toml"
    fleet.controller.cli(
        "devices", "register", device_id, "--agent-config", str(config), "--issue-cert",
        "--agent-data-dir", str(workdir / device_id), "--agent-socket", str(workdir / f"{device_id}.sock"),
    )  # fmt: skip
    doc = tomllib.loads(config.read_text())
    doc["telemetry_interval_s"] = 0.5
    config.write_text(tomli_w.dumps(doc))
    return AgentProcess(device_id, config, workdir / device_id, workdir / f"{device_id}.sock")


def telemetry_windows(fleet: Fleet, device_id: str) -> int:
    return len(fleet.controller.api("GET", f"/v1/devices/{device_id}/telemetry?limit=1000").json())


def test_a_revoked_device_is_cut_off_at_once_and_cannot_log_in_again(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path)
    workdir = tmp_path / "agents"
    workdir.mkdir()
    agents: list[AgentProcess] = []
    try:
        stolen = certified_agent(fleet, workdir, "cam-stolen")
        honest = certified_agent(fleet, workdir, "cam-honest")
        agents += [stolen.start(), honest.start()]
        for agent in agents:
            wait_until(lambda a=agent: fleet.online(a.device_id), 60, f"{agent.device_id} online")
        serial = x509.load_pem_x509_certificate((workdir / "cam-stolen.crt").read_bytes()).serial_number

        refusals = fleet.broker.log_file.read_text().count("certificate verify failed")
        revoked = fleet.controller.cli("devices", "revoke", "cam-stolen", "--reason", "stolen")
        assert revoked["device_id"] == "cam-stolen"
        assert revoked["certificates_revoked"] == [f"{serial:x}"]
        assert (revoked["reason"], revoked["session_ended"]) == ("stolen", True)
        crl = x509.load_pem_x509_crl((fleet.controller.data_dir / "ca" / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert crl.is_signature_valid(
            x509.load_pem_x509_certificate(
                (fleet.controller.data_dir / "ca" / "ca.crt").read_bytes()
            ).public_key()  # type: ignore[arg-type]
        )
        device = fleet.controller.api("GET", "/v1/devices/cam-stolen").json()
        assert device["revoked_at"] is not None and not device["online"]

        # Its session ends at once, and it cannot come back: the broker refuses its certificate.
        wait_until(
            lambda: "broker disconnected device=cam-stolen" in stolen.log(),
            30,
            f"cam-stolen cut off:\n{stolen.log()}",
        )
        wait_until(
            lambda: fleet.broker.log_file.read_text().count("certificate verify failed") >= refusals + 2,
            60,
            "the broker refusing the revoked certificate, twice",
        )
        assert stolen.alive(), "the agent keeps retrying, as for any refused login"
        assert "refused our client certificate" in stolen.log() and "as revoked" in stolen.log()
        seen = telemetry_windows(fleet, "cam-stolen")

        # A restarted broker reads the list again; the honest device carries on through it all.
        fleet.broker.restart()
        wait_until(lambda: fleet.online("cam-honest"), 60, "cam-honest back online")
        before = telemetry_windows(fleet, "cam-honest")
        wait_until(lambda: telemetry_windows(fleet, "cam-honest") > before + 2, 30, "cam-honest telemetry")
        assert telemetry_windows(fleet, "cam-stolen") == seen
        assert not fleet.online("cam-stolen")

        # A revoked device gets no new certificate, and its id is not registered again.
        refused = fleet.controller.cli(
            "devices", "issue-cert", "cam-stolen", "--out-dir", str(tmp_path), check=False
        )
        assert refused.returncode == 1 and "revoked" in refused.stderr
        again = fleet.controller.cli("devices", "register", "cam-stolen", check=False)
        assert again.returncode == 1
    finally:
        for agent in agents:
            agent.stop()
        fleet.controller.stop()
        fleet.broker.stop()
