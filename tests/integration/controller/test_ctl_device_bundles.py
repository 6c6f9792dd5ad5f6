"""What a provisioning bundle is made from: a registered device's credentials carry the CA its
broker's TLS certificate is verified with (empty for plain TCP), so `devices register --bundle`
hands it to the device without --issue-cert."""

from __future__ import annotations

from pathlib import Path

from controller import settings as settings_mod
from controller.service import InitOptions, initialise
from tests.support.broker import Broker, TlsListener
from tests.support.certs import issue, make_ca
from tests.support.controller_process import Ctl, running


def test_plain_tcp_credentials_carry_no_ca(ctl: Ctl) -> None:
    body = ctl.api("POST", "/v1/devices", json={"device_id": "cam-plain"}).json()
    assert body["broker_ca_pem"] == ""


def test_a_tls_brokers_ca_comes_with_the_credentials(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki", "broker-ca")
    server = issue(pki, tmp_path / "pki", "broker", "localhost", server=True)
    tls = TlsListener(server.cert_file, server.key_file, pki.cert_file)
    broker = Broker(tmp_path / "mosquitto", tls=tls).start()
    try:
        data_dir = tmp_path / "controller"
        token = initialise(
            data_dir,
            InitOptions(
                broker_host="localhost",
                broker_port=tls.port,
                mosquitto_passwd_file=broker.passwd_file,
                broker_reload_command=broker.reload_command,
                mqtt_tls_ca_file=pki.cert_file,
            ),
        )
        with running(broker, settings_mod.load(data_dir), token) as ctl:
            response = ctl.api("POST", "/v1/devices", json={"device_id": "cam-tls"})
            assert response.status_code == 201, response.text
            assert response.json()["broker_ca_pem"] == pki.cert_file.read_text()
    finally:
        broker.stop()
