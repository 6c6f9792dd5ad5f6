"""MQTT over TLS, as deployed: Mosquitto with deploy/mosquitto/edgefleet-tls.conf's
listener, the controller process and agent processes verifying the broker against
a CA file, and devices logging in with certificates from the controller's CA
(`edgefleet devices register --issue-cert`, use_identity_as_username)."""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import tomli_w
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, TlsListener
from tests.support.certs import Issued, issue, make_ca
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class TlsFleet:
    workdir: Path
    pki: Issued  # the CA of the broker's certificate
    broker: Broker
    controller: Controller

    @property
    def controller_ca(self) -> Path:
        return self.controller.data_dir / "ca" / "ca.crt"

    def online(self, device_id: str) -> bool:
        return bool(self.controller.api("GET", f"/v1/devices/{device_id}").json()["online"])


def start_tls_fleet(workdir: Path, client_certificates: bool, *init_options: str) -> TlsFleet:
    """The controller is initialised first: its CA (made by `controller init`) is what the
    broker checks client certificates with, so it must exist before the broker starts."""
    pki = make_ca(workdir / "pki", "broker-ca")
    server = issue(pki, workdir / "pki", "broker", "localhost", server=True)
    client_cas = workdir / "pki" / "client-cas.crt"
    tls = TlsListener(server.cert_file, server.key_file, client_cas, require_certificate=client_certificates)
    broker = Broker(workdir / "mosquitto", tls=tls)
    controller = Controller(workdir / "controller", tls.port, passwd_file=broker.passwd_file)
    controller.init(
        "--mqtt-tls-ca-file",
        str(pki.cert_file),
        *(["--mqtt-client-certificate"] if client_certificates else []),
        *init_options,
    )
    # Clients may hold certificates from the controller's CA, or (to test an expired one)
    # from the test's own CA.
    client_cas.write_text((controller.data_dir / "ca" / "ca.crt").read_text() + pki.cert_file.read_text())
    broker.start()
    settings_file = controller.data_dir / "controller.toml"
    settings = tomllib.loads(settings_file.read_text())
    settings["broker_reload_command"] = broker.reload_command
    settings_file.write_text(tomli_w.dumps(settings))
    controller.start()
    return TlsFleet(workdir, pki, broker, controller)


def set_mqtt(agent: AgentProcess, **keys: object) -> None:
    doc = tomllib.loads(agent.config.read_text())
    doc["mqtt"].update(keys)
    agent.config.write_text(tomli_w.dumps(doc))


def count(text: str, needle: str) -> int:
    return text.count(needle)


def test_controller_and_agent_log_in_with_certificates_over_tls(tmp_path: Path) -> None:
    fleet = start_tls_fleet(tmp_path, client_certificates=True)
    agent: AgentProcess | None = None
    try:
        wait_until(
            lambda: "mqtt connected" in fleet.controller.log_file.read_text(), 30, "controller over TLS"
        )
        controller_log = fleet.controller.log_file.read_text()
        assert "unencrypted" not in controller_log

        workdir = tmp_path / "agents"
        workdir.mkdir()
        config = workdir / "cam-tls.toml"
        fleet.controller.cli(
            "devices", "register", "cam-tls", "--agent-config", str(config), "--issue-cert",
            "--agent-data-dir", str(workdir / "cam-tls"), "--agent-socket", str(workdir / "cam-tls.sock"),
        )  # fmt: skip
        agent = AgentProcess("cam-tls", config, workdir / "cam-tls", workdir / "cam-tls.sock")
        mqtt = tomllib.loads(config.read_text())["mqtt"]
        assert (mqtt["tls_ca_file"], mqtt["tls_cert_file"], mqtt["tls_key_file"]) == (
            "broker-ca.crt",
            "cam-tls.crt",
            "cam-tls.key",
        )
        assert (workdir / "cam-tls.key").stat().st_mode & 0o077 == 0
        # The certificate is the login: the broker does not even look at the password.
        set_mqtt(agent, password="not-the-password")
        agent.start()
        wait_until(lambda: fleet.online("cam-tls"), 60, f"cam-tls online over TLS; log:\n{agent.log()}")
        assert "unencrypted" not in agent.log()
        assert "client certificate needs attention" not in agent.log()  # 730 days ahead
        broker_log = fleet.broker.log_file.read_text()
        assert "as cam-tls (" in broker_log and "u'cam-tls'" in broker_log
        assert "u'edgefleet-controller'" in broker_log

        # Renewal: a new certificate into the same folder, read by the agent when it starts.
        first = x509.load_pem_x509_certificate((workdir / "cam-tls.crt").read_bytes())
        fleet.controller.cli("devices", "issue-cert", "cam-tls", "--out-dir", str(workdir))
        renewed = x509.load_pem_x509_certificate((workdir / "cam-tls.crt").read_bytes())
        assert renewed.serial_number != first.serial_number
        agent.stop()
        wait_until(lambda: not fleet.online("cam-tls"), 30, "cam-tls offline")
        agent.start()
        wait_until(lambda: fleet.online("cam-tls"), 60, f"cam-tls online again; log:\n{agent.log()}")
        agent.stop()

        # On the TLS listener too the client id is the username: a device certificate
        # asking for the controller's client id gets its own.
        logins = broker_log_logins(fleet.broker, "cam-tls")
        intruder = certificate_client(
            fleet, workdir / "cam-tls.crt", workdir / "cam-tls.key", "edgefleet-controller"
        )
        try:
            wait_until(
                lambda: broker_log_logins(fleet.broker, "cam-tls") > logins, 10, "the intruder's login"
            )
            assert "mqtt disconnected" not in fleet.controller.log_file.read_text()
        finally:
            intruder.disconnect()
            intruder.loop_stop()
    finally:
        if agent is not None:
            agent.stop()
        fleet.controller.stop()
        fleet.broker.stop()


def broker_log_logins(broker: Broker, client_id: str) -> int:
    return broker.log_file.read_text().count(f" as {client_id} (")


def certificate_client(fleet: TlsFleet, cert_file: Path, key_file: Path, client_id: str) -> mqtt.Client:
    assert fleet.broker.tls is not None
    context = ssl.create_default_context(cafile=str(fleet.pki.cert_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(context)
    client.connect("127.0.0.1", fleet.broker.tls.port, 30)
    client.loop_start()
    return client


def test_wrong_ca_and_expired_certificate_are_refused_naming_the_cause(tmp_path: Path) -> None:
    fleet = start_tls_fleet(tmp_path, client_certificates=True)
    agents: list[AgentProcess] = []
    try:
        workdir = tmp_path / "agents"
        other_ca = make_ca(workdir / "other", "other-ca")
        wrong_ca = register_agent(fleet.controller, workdir, "cam-wrong-ca")
        set_mqtt(wrong_ca, tls_ca_file=str(other_ca.cert_file))
        expired = register_agent(fleet.controller, workdir, "cam-expired")
        old = issue(fleet.pki, workdir / "old", "cam-expired", "cam-expired", expired=True)
        set_mqtt(
            expired,
            tls_ca_file=str(fleet.pki.cert_file),
            tls_cert_file=str(old.cert_file),
            tls_key_file=str(old.key_file),
        )
        agents += [wrong_ca.start(), expired.start()]

        not_signed = f"the broker's certificate is not signed by the CA in {other_ca.cert_file}"
        wait_until(
            lambda: count(wrong_ca.log(), not_signed) >= 2, 60, f"retries naming the CA:\n{wrong_ca.log()}"
        )
        expired_at = f"our client certificate {old.cert_file} expired at"
        wait_until(
            lambda: count(expired.log(), expired_at) >= 2, 60, f"retries naming the date:\n{expired.log()}"
        )
        # Refused, and still running: each keeps retrying with backoff.
        assert wrong_ca.alive() and expired.alive()
        assert not fleet.online("cam-wrong-ca") and not fleet.online("cam-expired")
        assert "certificate verify failed" in fleet.broker.log_file.read_text()
    finally:
        for agent in agents:
            agent.stop()
        fleet.controller.stop()
        fleet.broker.stop()


def test_controller_with_the_wrong_ca_says_why_and_keeps_serving(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki", "broker-ca")
    other = make_ca(tmp_path / "pki", "other-ca")
    server = issue(pki, tmp_path / "pki", "broker", "localhost", server=True)
    tls = TlsListener(server.cert_file, server.key_file, pki.cert_file)
    broker = Broker(tmp_path / "mosquitto", tls=tls).start()
    controller = Controller(
        tmp_path / "controller",
        tls.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    try:
        controller.init("--mqtt-tls-ca-file", str(other.cert_file))
        controller.start()
        message = f"the broker's certificate is not signed by the CA in {other.cert_file}"
        wait_until(lambda: count(controller.log_file.read_text(), message) >= 2, 60, "retries naming the CA")
        assert controller.api("GET", "/v1/devices").status_code == 200
    finally:
        controller.stop()
        broker.stop()


def test_plain_tcp_still_works_and_says_it_is_unencrypted(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "mosquitto").start()
    controller = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    agent: AgentProcess | None = None
    try:
        controller.start()
        agent = register_agent(controller, tmp_path / "agents", "cam-plain").start()
        wait_until(
            lambda: controller.api("GET", "/v1/devices/cam-plain").json()["online"], 60, "cam-plain online"
        )
        assert "mqtt connection to the broker is unencrypted" in controller.log_file.read_text()
        assert "broker connection is unencrypted device=cam-plain" in agent.log()
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()
        broker.stop()


def test_a_model_rolls_out_over_tls_while_telemetry_flows(tmp_path: Path) -> None:
    """Chunks, acknowledgements and desired states go out from the controller's worker
    threads while its network thread reads: over TLS the connection must stay whole."""
    fleet = start_tls_fleet(tmp_path, True, "--chunk-size", "1024")
    agents: list[AgentProcess] = []
    try:
        digits = digits_classifier(tmp_path / "digits.onnx")
        fleet.controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
        workdir = tmp_path / "agents"
        for i in range(2):
            device_id = f"cam-{i}"
            agent = register_agent(fleet.controller, workdir, device_id, telemetry_interval=0.2)
            fleet.controller.cli("devices", "issue-cert", device_id, "--out-dir", str(workdir))
            set_mqtt(
                agent,
                tls_ca_file="broker-ca.crt",
                tls_cert_file=f"{device_id}.crt",
                tls_key_file=f"{device_id}.key",
            )
            agents.append(agent.start())
        wait_until(lambda: all(fleet.online(a.device_id) for a in agents), 60, "agents online over TLS")
        rollout = fleet.controller.cli(
            "rollouts",
            "create",
            "--model",
            "digits",
            "--version",
            "1",
            "--device",
            "cam-0",
            "--device",
            "cam-1",
        )
        final = wait_until(
            lambda: rollout_done(fleet.controller, rollout["id"]), 120, "the rollout to finish"
        )
        assert final["status"] == "succeeded", final
        assert "mqtt disconnected" not in fleet.controller.log_file.read_text()
        assert "Protocol error" not in fleet.broker.log_file.read_text()
    finally:
        for agent in agents:
            agent.stop()
        fleet.controller.stop()
        fleet.broker.stop()
