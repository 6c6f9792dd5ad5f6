"""TLS to the MQTT broker, alike for the agent and the controller.

Both halves verify the broker's certificate against a CA file and the host name
they dial, may present a client certificate (Mosquitto's
``use_identity_as_username`` then takes the MQTT username from its common
name), and turn a failed handshake into a sentence an operator can act on. Only
:mod:`ssl` here: reading a certificate's dates needs a crypto library and lives
in each half, as signing does.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

# OpenSSL's X509_V_ERR_* codes, as SSLCertVerificationError.verify_code carries them.
_NOT_YET_VALID = 9
_EXPIRED = 10
_UNTRUSTED = {2, 18, 19, 20, 21}
_HOST_MISMATCH = {62, 64}  # a host name, an IP address


class TlsSetupError(Exception):
    """A CA, certificate or key file cannot be used; the message names the file."""


@dataclass(frozen=True)
class BrokerTls:
    """Files a client uses to talk TLS to the broker (paths; cert and key go together)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def context(self) -> ssl.SSLContext:
        """A client context that checks the broker's certificate and host name (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"CA file {self.ca_file}: cannot load: {_reason(exc)}") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise TlsSetupError(
                    f"client certificate {self.cert_file} with key {self.key_file}: cannot load: {_reason(exc)}"
                ) from None
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return {
            "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
            "NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in the file",
        }.get(exc.reason, exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def explain(
    error: BaseException | str,
    tls: BrokerTls | None,
    host: str,
    certificate_problem: Callable[[str], str | None] | None = None,
) -> str:
    """Why a connection to the broker failed, naming the cause and the file to look at.

    ``error`` is the exception raised while connecting, or the text paho logged
    when the broker ended the session right after the handshake (with TLS 1.3
    the broker judges a client certificate only then, and an expired one is
    answered by closing the connection: ``certificate_problem``, which reads our
    certificate's dates, names that cause)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    if tls is None or isinstance(error, (ConnectionRefusedError, TimeoutError, socket.gaierror)):
        return text
    if isinstance(error, ssl.SSLCertVerificationError):
        code, detail = error.verify_code, error.verify_message
        if code == _EXPIRED:
            return f"the broker's certificate has expired ({detail}): the broker needs a new certificate"
        if code == _NOT_YET_VALID:
            return f"the broker's certificate is not valid yet ({detail}): check this machine's clock"
        if code in _UNTRUSTED:
            return (
                f"the broker's certificate is not signed by the CA in {tls.ca_file} ({detail}): "
                "wrong CA file, or the wrong broker"
            )
        if code in _HOST_MISMATCH:
            return f"the broker's certificate does not name the host {host!r} ({detail})"
        return f"the broker's certificate was refused: {detail}"
    if isinstance(error, ConnectionResetError):
        # Raised while connecting, before any MQTT: Mosquitto resets a TLS hello on a plain listener.
        return f"the broker reset the connection during the TLS handshake: is the port its plain listener? ({text})"
    problem = certificate_problem(tls.cert_file) if tls.cert_file and certificate_problem else None
    if problem:
        return problem
    ours = f"our client certificate {tls.cert_file}" if tls.cert_file else "no client certificate"
    if "UNKNOWN_CA" in text:
        return f"the broker does not trust {ours}: it was not issued by the CA the broker checks clients with"
    if "CERTIFICATE_EXPIRED" in text:
        return f"the broker refused {ours} as expired"
    if "CERTIFICATE_REQUIRED" in text or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text:
        return "the broker requires a client certificate: configure a certificate and key"
    if "CERTIFICATE_REVOKED" in text:
        return (
            f"the broker refused {ours} as revoked: this device was revoked on the controller "
            f"(edgefleet devices revoke) and needs a new identity ({text})"
        )
    if "BAD_CERTIFICATE" in text or "UNSUPPORTED_CERTIFICATE" in text:
        return f"the broker refused {ours} ({text})"
    if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER_FAILURE" in text:
        return f"the broker's port does not speak TLS: is it the plain listener? ({text})"
    if "EOF occurred in violation of protocol" in text or "UNEXPECTED_EOF" in text:
        if tls.cert_file:
            return (
                f"the broker closed the connection during the TLS handshake: it refused {ours} "
                "(expired, revoked, or not from the CA it checks clients with)"
            )
        return (
            "the broker closed the connection during the TLS handshake: it may require a client certificate"
        )
    return text


class LastError(logging.Handler):
    """Keeps the last error paho logs. When the broker ends a TLS session right after the
    handshake (a refused client certificate under TLS 1.3), paho reports only "connection
    lost"; the ssl error it logged just before is the cause."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()

    def take(self) -> str:
        message, self.message = self.message, ""
        return message

    def logger(self) -> logging.Logger:
        """A logger for ``Client.enable_logger`` that only feeds this handler: outside the
        logging tree, and at ERROR, so paho's per-packet debug lines cost a level check."""
        logger = logging.Logger("paho", logging.ERROR)
        logger.addHandler(self)
        return logger
