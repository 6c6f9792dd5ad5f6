"""TLS to the broker on the device: the client context from ``[mqtt]``, and our own
certificate's dates (a broker answers an expired client certificate by closing
the connection, so only we can say why)."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from edgefleet_proto.broker_tls import BrokerTls, TlsSetupError

from agent.config import MqttConfig
from agent.errors import ConfigError


def broker_tls(config: MqttConfig) -> BrokerTls | None:
    """The TLS files of ``[mqtt]``, or None for plain TCP."""
    if not config.tls_ca_file:
        return None
    return BrokerTls(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)


def client_context(tls: BrokerTls) -> ssl.SSLContext:
    try:
        return tls.context()
    except TlsSetupError as exc:
        raise ConfigError(f"[mqtt] TLS: {exc}") from None


def certificate_problem(cert_file: str, now: dt.datetime | None = None) -> str | None:
    """Why our own client certificate cannot be accepted today, if its dates say so."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        return f"our client certificate {cert_file} cannot be read: {exc}"
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return (
            f"our client certificate {cert_file} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z: "
            "have a new one issued (edgefleet devices issue-cert ID)"
        )
    if now < cert.not_valid_before_utc:
        return (
            f"our client certificate {cert_file} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z: check this device's clock"
        )
    return None
