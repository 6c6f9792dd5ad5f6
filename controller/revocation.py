"""Revoking a device: a stolen or retired device loses every way in, at once.

:meth:`Revocations.revoke` does, in this order:

1. records the device revoked and every certificate issued for it (each issue is
   recorded by :meth:`Revocations.record_issued`) as revoked, and marks it offline;
2. writes the CA's revocation list with every revoked serial (controller.certificates),
   which the broker's TLS listener reads (``crlfile``): its certificates are refused at
   every handshake from now on;
3. rewrites the broker's password file without the device and reloads the broker (which
   reads the revocation list again too): its password is refused from now on;
4. ends the session it may still hold, since neither the list nor the password file
   touches a connection already made: the controller logs in with the device's own
   client id (the broker binds client ids to usernames), which makes the broker end the
   device's session, and logs out. It logs in as the device with a one-day certificate
   from the CA when it logs in with a certificate itself (that certificate is revoked
   right after), else with a one-time password in the password file (removed right after).

From then on the controller ignores whatever the device still sends (it is not a known
device any more), publishes nothing to it, issues it no certificate and does not register
its id again. A revocation is not undone: a device coming back gets a new id.

The list is issued for :data:`~controller.certificates.CRL_VALID_DAYS` days and
:meth:`Revocations.refresh` (the maintenance tick) issues it anew well before then: a
broker whose list has expired refuses every certificate.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from edgefleet_proto.broker_tls import BrokerTls, TlsSetupError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.certificates import (
    CertificateAuthority,
    IssuedCertificate,
    new_client_key,
    private_key_pem,
    public_key_pem,
)
from controller.errors import DeviceRevoked
from controller.files import atomic_write
from controller.fleet import Fleet
from controller.mosquitto_auth import generate_password, hash_password
from controller.settings import Settings
from controller.store import Store

log = logging.getLogger(__name__)

# How long ending a session may take: the broker reloads its password file, then answers.
SESSION_END_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Revoked:
    device_id: str
    revoked_at: float
    reason: str
    # Hex serials of the device's certificates now on the revocation list.
    certificates_revoked: list[str]
    # Whether a session the device held on the broker was ended (False: none could be).
    session_ended: bool


class Revocations:
    def __init__(self, store: Store, ca: CertificateAuthority, fleet: Fleet, settings: Settings) -> None:
        self.store = store
        self.ca = ca
        self.fleet = fleet
        self.settings = settings
        self._lock = threading.Lock()
        # The list on disk holds every revoked serial whatever happened to the file meanwhile
        # (the CA writes an empty one where it finds none); the broker reads it at its next reload.
        self._write_list()

    def record_issued(self, device_id: str, issued: IssuedCertificate) -> None:
        self.store.execute(
            "INSERT INTO device_certificates (serial, device_id, issued_at, not_after) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (serial) DO UPDATE SET device_id = excluded.device_id, issued_at = excluded.issued_at,"
            " not_after = excluded.not_after, revoked_at = NULL, temporary = 0",
            (f"{issued.serial:x}", device_id, time.time(), issued.not_after),
        )

    def refuse_revoked(self, device_id: str) -> None:
        """DeviceRevoked for a revoked device (no certificate is issued for it)."""
        at = self.revoked_at(device_id)
        if at is not None:
            raise DeviceRevoked(
                f"device {device_id} was revoked at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(at))}Z: "
                "a revoked device gets no certificate; register the device again under a new id"
            )

    def revoked_at(self, device_id: str) -> float | None:
        row = self.store.query_one(
            "SELECT revoked_at FROM device_revocations WHERE device_id = ?", (device_id,)
        )
        return float(row["revoked_at"]) if row else None

    def all_revoked(self) -> dict[str, float]:
        return {r["device_id"]: r["revoked_at"] for r in self.store.query("SELECT * FROM device_revocations")}

    def revoke(self, device_id: str, reason: str = "") -> Revoked:
        """Revoke ``device_id`` (see the module); revoking it again ends any session it holds again."""
        self.fleet.get(device_id)
        with self._lock:
            now = time.time()
            with self.store.transaction() as tx:
                tx.execute(
                    "INSERT INTO device_revocations (device_id, revoked_at, reason) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (device_id, now, reason),
                )
                tx.execute(
                    "UPDATE device_certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                    (now, device_id),
                )
                tx.execute("UPDATE devices SET online = 0 WHERE device_id = ?", (device_id,))
            self._write_list()
            self.fleet.forget(device_id)
            self.fleet.sync_broker()
            ended = self._end_session(device_id)
            row = self.store.query_one("SELECT * FROM device_revocations WHERE device_id = ?", (device_id,))
            assert row is not None
        serials = [
            r["serial"]
            for r in self.store.query(
                "SELECT serial FROM device_certificates WHERE device_id = ? AND revoked_at IS NOT NULL"
                " AND NOT temporary ORDER BY issued_at",
                (device_id,),
            )
        ]
        log.warning(
            "device revoked device=%s certificates=%s session_ended=%s reason=%r",
            device_id,
            ",".join(serials) or "-",
            ended,
            row["reason"],
        )
        return Revoked(device_id, row["revoked_at"], row["reason"], serials, ended)

    def refresh(self) -> bool:
        """Issue the revocation list anew when it is past half its validity; True if it was."""
        if not self.ca.crl_due():
            return False
        with self._lock:
            self._write_list()
            self.fleet.broker_auth.reload()
        return True

    def _write_list(self) -> None:
        # An expired certificate is refused anyway: the list keeps only those still valid.
        rows = self.store.query(
            "SELECT serial, revoked_at FROM device_certificates WHERE revoked_at IS NOT NULL AND not_after > ?",
            (time.time(),),
        )
        self.ca.write_crl([(int(r["serial"], 16), float(r["revoked_at"])) for r in rows])

    def _end_session(self, device_id: str) -> bool:
        """Log in with the device's client id, so the broker ends its session; then log out."""
        if self.settings.mqtt_tls_cert_file is not None:
            return self._end_with_certificate(device_id)
        return self._end_with_password(device_id)

    def _end_with_password(self, device_id: str) -> bool:
        password = generate_password()
        entries = [*self.fleet.password_entries(), (device_id, hash_password(password))]
        self.fleet.broker_auth.sync(entries)
        try:
            return _log_in_and_out(self.settings, device_id, password, None)
        finally:
            self.fleet.sync_broker()

    def _end_with_certificate(self, device_id: str) -> bool:
        key = new_client_key()
        issued = self.ca.issue_client(device_id, public_key_pem(key), valid_days=1)
        self.store.execute(
            "INSERT INTO device_certificates (serial, device_id, issued_at, not_after, temporary)"
            " VALUES (?, ?, ?, ?, 1)",
            (f"{issued.serial:x}", device_id, time.time(), issued.not_after),
        )
        try:
            with tempfile.TemporaryDirectory(prefix="edgefleet-revoke-") as folder:
                cert_file, key_file = Path(folder) / "device.crt", Path(folder) / "device.key"
                atomic_write(key_file, private_key_pem(key), mode=0o600)
                atomic_write(cert_file, issued.certificate_pem.encode(), mode=0o600)
                return _log_in_and_out(self.settings, device_id, "", (cert_file, key_file))
        finally:
            self.store.execute(
                "UPDATE device_certificates SET revoked_at = ? WHERE serial = ?",
                (time.time(), f"{issued.serial:x}"),
            )
            self._write_list()
            self.fleet.broker_auth.reload()


def _log_in_and_out(
    settings: Settings, device_id: str, password: str, certificate: tuple[Path, Path] | None
) -> bool:
    """Connect as ``device_id`` with a clean start (the broker ends the session of the client
    with that id), then disconnect. Tried again while the broker has not reloaded its files."""
    deadline = time.monotonic() + SESSION_END_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            client = _client(settings, device_id, password, certificate)
        except TlsSetupError as exc:
            log.error("cannot end the session device=%s error=%s", device_id, exc)
            return False
        if _connected_once(client, settings, deadline):
            log.info("session ended on the broker device=%s", device_id)
            return True
        time.sleep(0.2)
    log.error("could not end the session on the broker device=%s", device_id)
    return False


def _client(
    settings: Settings, device_id: str, password: str, certificate: tuple[Path, Path] | None
) -> mqtt.Client:
    v5 = settings.mqtt_protocol == "v5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=device_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
    )
    if password:
        client.username_pw_set(device_id, password)
    if settings.mqtt_tls_ca_file is not None:
        cert, key = certificate or (None, None)
        client.tls_set_context(
            BrokerTls(str(settings.mqtt_tls_ca_file), str(cert or ""), str(key or "")).context()
        )
    return client


def _connected_once(client: mqtt.Client, settings: Settings, deadline: float) -> bool:
    """Whether the broker accepted the login (then logged out at once)."""
    accepted, answered = threading.Event(), threading.Event()

    def on_connect(c: mqtt.Client, u: object, f: object, rc: ReasonCode, p: object) -> None:
        if not rc.is_failure:
            accepted.set()
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(settings.broker_host, settings.broker_port, 10)
        client.loop_start()
        answered.wait(max(0.0, deadline - time.monotonic()))
    except (OSError, ValueError) as exc:
        log.info("ending a session: broker not reached error=%s", exc)
    finally:
        if accepted.is_set():
            client.disconnect()
        client.loop_stop()
    return accepted.is_set()
