"""The controller's certificate authority, for per-device client certificates.

A broker TLS listener with ``require_certificate true`` and
``use_identity_as_username true`` takes a client's MQTT username from its
certificate's common name, so a certificate issued here for a device id logs in
as that device (and the broker's ACL keeps it under its own topics). The CA is
created once by ``edgefleet controller init`` in ``DATA/ca/`` (``ca.key`` mode
0600; ``ca.crt`` is what the broker's ``cafile`` names). A device's key pair is
made by the operator's CLI: only the public key reaches the controller.

A revoked certificate goes on the CA's revocation list (``crl.pem`` beside ``ca.crt``),
which the broker's ``crlfile`` names: OpenSSL then refuses it at every handshake. With
``crlfile`` set OpenSSL wants a current list for the CA, so one is always there (empty at
first) and is issued anew well before its ``next_update``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.errors import CertificateError, InvalidPublicKey
from controller.files import atomic_write

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
# The certificate revocation list the broker's TLS listener reads (crlfile): the serials of
# revoked client certificates, signed by the CA. Written when the CA is loaded if missing, at
# each revocation, and again before it expires (a broker with an expired list refuses everyone).
CRL_FILE = "crl.pem"
CRL_VALID_DAYS = 30
CA_VALID_DAYS = 3650
CLIENT_VALID_DAYS = 730
MAX_VALID_DAYS = 3650
# A certificate is valid from a little before it is issued, for devices whose clock lags.
CLOCK_SKEW = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class IssuedCertificate:
    common_name: str
    serial: int
    certificate_pem: str
    not_after: float


def new_client_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.folder = folder
        self._key = key
        self.cert = cert

    @property
    def cert_file(self) -> Path:
        return self.folder / CA_CERT_FILE

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def crl_file(self) -> Path:
        return self.folder / CRL_FILE

    @classmethod
    def load_or_create(cls, folder: Path) -> CertificateAuthority:
        key_file, cert_file = folder / CA_KEY_FILE, folder / CA_CERT_FILE
        if not key_file.exists() and not cert_file.exists():
            ca = cls._create(folder)
            ca.write_crl([])
            return ca
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise CertificateError(f"the controller's CA in {folder} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertificateError(
                f"the controller's CA in {folder}: {CA_KEY_FILE} does not match {CA_CERT_FILE}"
            )
        ca = cls(folder, key, cert)
        if not ca.crl_file.exists():
            # A CA made before revocation lists were: none is revoked yet (controller.revocation
            # writes the list again with every revoked serial when it starts).
            ca.write_crl([])
        return ca

    @classmethod
    def _create(cls, folder: Path) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgeFleet controller CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # The key first: a folder with a certificate and no key is never left behind.
        atomic_write(folder / CA_KEY_FILE, private_key_pem(key), mode=0o600)
        atomic_write(folder / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        log.info("certificate authority created folder=%s", folder)
        return cls(folder, key, cert)

    def issue_client(
        self, common_name: str, public_key: str, valid_days: int = CLIENT_VALID_DAYS
    ) -> IssuedCertificate:
        """A client certificate naming ``common_name`` (the MQTT username it logs in as)
        for ``public_key`` (PEM, EC P-256/P-384 or RSA of 2048 bits or more)."""
        if not 1 <= valid_days <= MAX_VALID_DAYS:
            raise InvalidPublicKey(f"valid_days must be 1..{MAX_VALID_DAYS}, got {valid_days}")
        try:
            key = serialization.load_pem_public_key(public_key.encode())
        except (ValueError, UnicodeError) as exc:
            raise InvalidPublicKey(f"public key is not a PEM public key: {exc}") from None
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise InvalidPublicKey(f"EC public key on {key.curve.name}: use P-256 or P-384")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise InvalidPublicKey(f"RSA public key of {key.key_size} bits: use 2048 or more")
        else:
            raise InvalidPublicKey(f"{type(key).__name__} keys are not accepted: use EC P-256 or RSA")
        now = dt.datetime.now(dt.UTC)
        # Whole seconds: what the certificate holds, and so what not_after reports.
        not_after = min(now + dt.timedelta(days=valid_days), self.cert.not_valid_after_utc).replace(
            microsecond=0
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        log.info(
            "client certificate issued common_name=%s serial=%x not_after=%s",
            common_name,
            cert.serial_number,
            not_after.isoformat(),
        )
        return IssuedCertificate(
            common_name=common_name,
            serial=cert.serial_number,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            not_after=not_after.timestamp(),
        )

    def write_crl(
        self, revoked: Iterable[tuple[int, float]], now: dt.datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Issue the revocation list of ``revoked`` (serial, when revoked) and write it
        atomically to :attr:`crl_file` (world-readable: the broker reads it)."""
        now = now or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=CRL_VALID_DAYS))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for serial, at in sorted(revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(at, dt.UTC))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        atomic_write(self.crl_file, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        log.info(
            "revocation list written path=%s revoked=%d next_update=%s",
            self.crl_file,
            len(crl),
            crl.next_update_utc,
        )
        return crl

    def crl_due(self, now: dt.datetime | None = None) -> bool:
        """Whether the revocation list is missing, unreadable or past half its validity."""
        now = now or dt.datetime.now(dt.UTC)
        try:
            crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
        except (OSError, ValueError):
            return True
        next_update = crl.next_update_utc
        return next_update is None or next_update - now < dt.timedelta(days=CRL_VALID_DAYS / 2)

    def write_client(self, common_name: str, cert_file: Path, key_file: Path) -> IssuedCertificate:
        """Issue a certificate and key for a client on this machine (the controller itself)."""
        key = new_client_key()
        issued = self.issue_client(common_name, public_key_pem(key))
        atomic_write(key_file, private_key_pem(key), mode=0o600)
        atomic_write(cert_file, issued.certificate_pem.encode(), mode=0o644)
        return issued


def broker_ca_pem(ca_file: Path | None) -> str:
    """The CA file the broker is verified with, handed to devices; empty in plain TCP."""
    if ca_file is None:
        return ""
    try:
        return ca_file.read_text()
    except (OSError, UnicodeError) as exc:
        raise CertificateError(f"mqtt_tls_ca_file {ca_file} cannot be read: {exc}") from None


def certificate_problem(cert_file: Path, now: dt.datetime | None = None) -> str | None:
    """Why a client certificate of ours cannot be accepted today, if its dates say so."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        return f"our client certificate {cert_file} cannot be read: {exc}"
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return f"our client certificate {cert_file} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    if now < cert.not_valid_before_utc:
        return (
            f"our client certificate {cert_file} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z: check this machine's clock"
        )
    return None
