"""The controller's CA: created by `controller init`, kept across restarts, and issuing
device certificates over the API for public keys it accepts."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller import settings as settings_mod
from controller.certificates import CertificateAuthority
from controller.errors import ConfigError
from controller.transport import broker_tls_context
from tests.support.broker import Broker, free_port
from tests.support.controller_process import Ctl, init_controller


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_init_creates_a_ca_that_a_restart_keeps(ctl: Ctl) -> None:
    folder = ctl.settings.data_dir / "ca"
    assert stat.S_IMODE((folder / "ca.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert CertificateAuthority.load_or_create(folder).cert == ca == ctl.controller.certificates.cert


def test_a_registered_device_gets_a_certificate_naming_it(ctl: Ctl) -> None:
    ctl.register("cam-7")
    key = ec.generate_private_key(ec.SECP256R1())
    response = ctl.api(
        "POST", "/v1/devices/cam-7/certificate", json={"public_key_pem": public_pem(key), "valid_days": 30}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_pem"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert body["not_after"] == cert.not_valid_after_utc.timestamp()
    assert body["serial"] == f"{cert.serial_number:x}"
    # The controller talks to this broker in plain TCP: it knows no broker CA to hand out.
    assert body["broker_ca_pem"] == ""


def test_certificates_are_refused_for_unknown_devices_and_unfit_keys(ctl: Ctl) -> None:
    good = public_pem(ec.generate_private_key(ec.SECP256R1()))
    response = ctl.api("POST", "/v1/devices/nobody/certificate", json={"public_key_pem": good})
    assert response.status_code == 404, response.text
    ctl.register("cam-8")
    refused = {
        "not a key": "public key is not a PEM public key",
        public_pem(rsa.generate_private_key(65537, 1024)): "RSA public key of 1024 bits: use 2048 or more",
        public_pem(ed25519.Ed25519PrivateKey.generate()): "keys are not accepted: use EC P-256 or RSA",
    }
    for pem, message in refused.items():
        response = ctl.api("POST", "/v1/devices/cam-8/certificate", json={"public_key_pem": pem})
        assert response.status_code == 422 and message in response.text, response.text
    response = ctl.api(
        "POST", "/v1/devices/cam-8/certificate", json={"public_key_pem": good, "valid_days": 0}
    )
    assert response.status_code == 422, response.text


def test_unusable_tls_files_stop_init_and_serve_with_the_file_named(broker: Broker, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.crt"
    with pytest.raises(ConfigError, match=f"CA file {missing}: cannot load: No such file"):
        init_controller(broker, tmp_path / "refused", mqtt_tls_ca_file=missing)
    assert not (tmp_path / "refused").exists()

    ca = tmp_path / "broker-ca.crt"
    ca.write_text(CertificateAuthority.load_or_create(tmp_path / "some-ca").cert_pem)
    settings, _ = init_controller(broker, tmp_path / "controller", mqtt_tls_ca_file=ca)
    ca.write_text("not a certificate\n")
    edgefleet = str(Path(sys.executable).parent / "edgefleet")
    serve = [
        edgefleet,
        "controller",
        "serve",
        "--data-dir",
        str(settings.data_dir),
        "--port",
        str(free_port()),
    ]
    done = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"error: mqtt_tls_*: CA file {ca}: cannot load" in done.stderr


def test_an_initialised_controller_is_switched_to_tls(broker: Broker, tmp_path: Path) -> None:
    settings, _ = init_controller(broker, tmp_path / "controller")
    before = settings.settings_path.read_bytes()
    edgefleet = str(Path(sys.executable).parent / "edgefleet")
    command = [edgefleet, "controller", "tls", "--data-dir", str(settings.data_dir), "--broker-port", "8883"]

    refused = subprocess.run(
        [*command, "--mqtt-tls-ca-file", str(tmp_path / "none.crt")], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "CA file" in refused.stderr and "cannot load" in refused.stderr
    assert settings.settings_path.read_bytes() == before

    ca = tmp_path / "broker-ca.crt"
    ca.write_text(CertificateAuthority.load_or_create(tmp_path / "broker-pki").cert_pem)
    done = subprocess.run(
        [*command, "--mqtt-tls-ca-file", str(ca), "--mqtt-client-certificate"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    switched = settings_mod.load(settings.data_dir)
    assert (switched.mqtt_tls_ca_file, switched.broker_port) == (ca, 8883)
    assert switched.mqtt_tls_cert_file is not None and switched.mqtt_tls_key_file is not None
    cert = x509.load_pem_x509_certificate(switched.mqtt_tls_cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edgefleet-controller"
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((settings.data_dir / "ca" / "ca.crt").read_bytes())
    )
    assert stat.S_IMODE(switched.mqtt_tls_key_file.stat().st_mode) == 0o600
    assert broker_tls_context(switched) is not None
