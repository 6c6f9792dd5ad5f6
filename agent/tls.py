"""TLS to the broker on the device: the client context from ``[mqtt]``, and our own
certificate's dates (a broker answers an expired client certificate by closing
the connection, so only we can say why)."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet_proto.broker_tls import BrokerTls, TlsSetupError

from agent.config import MqttConfig
from agent.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

# A client certificate this close to its end is announced at every start, so that
# it is renewed before the device falls off the broker.
RENEW_WITHIN = dt.timedelta(days=30)


def broker_tls(config: MqttConfig) -> BrokerTls | None:
    """The TLS files of ``[mqtt]``, or None for plain TCP."""
    if not config.tls_ca_file:
        return None
    return BrokerTls(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)


def client_context(tls: BrokerTls) -> ssl.SSLContext:
    try:
        context = tls.context()
    except TlsSetupError as exc:
        raise ConfigError(f"[mqtt] TLS: {exc}") from None
    if tls.cert_file:
        warning = certificate_problem(tls.cert_file) or renewal_due(tls.cert_file)
        if warning:
            log.warning("client certificate needs attention: %s", warning)
    return context


def renewal_due(cert_file: str, now: dt.datetime | None = None) -> str | None:
    """Said when our client certificate ends within RENEW_WITHIN."""
    cert = _certificate(cert_file)
    left = cert.not_valid_after_utc - (now or dt.datetime.now(dt.timezone.utc))
    if left > RENEW_WITHIN:
        return None
    return (
        f"our client certificate {cert_file} expires at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z "
        f"(in {left.days} days): have a new one issued (edgefleet devices issue-cert ID)"
    )


def certificate_problem(cert_file: str, now: dt.datetime | None = None) -> str | None:
    """Why our own client certificate cannot be accepted today, if its dates say so."""
    try:
        cert = _certificate(cert_file)
    except (OSError, ValueError) as exc:
        return f"our client certificate {cert_file} cannot be read: {exc}"
    now = now or dt.datetime.now(dt.timezone.utc)
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


def _certificate(cert_file: str) -> x509.Certificate:
    # Imported here: cryptography's X.509 modules would cost every start time and memory
    # on the many devices that have no client certificate (plain TCP, or a CA file only).
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
