"""The controller's CA: created by `controller init`, kept across restarts, and issuing
device certificates over the API for public keys it accepts."""

from __future__ import annotations

import datetime as dt
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.certificates import CertificateAuthority
from tests.integration.controller.conftest import Ctl


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
