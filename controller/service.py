"""The controller assembled: settings, store, artifacts, registry, fleet, rollouts,
telemetry and the MQTT transport, for the roles this process has (controller.roles), plus
first-time initialisation of a data folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller import roles as roles_mod
from controller import settings as settings_mod
from controller.artifacts import ArtifactStore
from controller.audit import AuditLog
from controller.auth import Accounts, generate_token, hash_token
from controller.certificates import CertificateAuthority
from controller.closed_loop import ClosedLoop
from controller.database_lock import DatabaseLock
from controller.device_quotas import CaptureQuota
from controller.errors import AlreadyInitialised, BrokerAuthError, ConfigError
from controller.files import atomic_write
from controller.fleet import Fleet
from controller.leases import MAINTENANCE, ROLLOUTS, Lease, LeaseKeeper, process_id
from controller.mosquitto_auth import BrokerAuth, generate_password, hash_password
from controller.mosquitto_config import ACL, BrokerFiles
from controller.optimize import Optimizer
from controller.profiles import Profiles
from controller.registry import Registry
from controller.revocation import Revocations
from controller.roles import Role
from controller.rollouts import RolloutRunner, Rollouts
from controller.settings import Settings
from controller.signing import Signer
from controller.store import Store
from controller.telemetry import TelemetryStore
from controller.transport import Transport, broker_tls_context

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self, settings: Settings, roles: frozenset[Role] = roles_mod.ALL, instance: int | None = None
    ) -> None:
        self.settings = settings
        self.roles = roles
        # The broker account of this process; checked before anything is opened.
        self.account = settings.mqtt_username if instance is None else roles_mod.account(instance)
        self.store = Store(settings.database)
        self._database_lock: DatabaseLock | None = None
        if self.store.path is not None and roles != roles_mod.ALL:
            self.store.close()
            raise ConfigError(
                f"--roles {roles_mod.describe(roles)} needs a database shared by several controller processes: "
                f"{self.store.where} is SQLite, which one controller process with every role uses alone "
                "(leave --roles out), or move to PostgreSQL (controller init --database postgresql://...)"
            )
        if self.store.path is not None:
            try:
                self._database_lock = DatabaseLock(self.store.path).acquire()
            except BaseException:
                self.store.close()
                raise
        # Days of raw telemetry and events ahead (PostgreSQL; the maintenance tick keeps it up).
        self.store.partitions.ensure_ahead(time.time())
        self.artifacts = ArtifactStore(settings.artifacts_dir, settings.chunk_size)
        self.broker_auth = BrokerAuth(settings.passwd_file, settings.broker_reload_command)
        self.signer = Signer.load_or_create(settings.data_dir / "signing")
        self.certificates = CertificateAuthority.load_or_create(settings.data_dir / "ca")
        self.registry = Registry(
            self.store,
            self.artifacts,
            settings.max_upload_bytes,
            self.signer,
            settings.max_model_memory_bytes,
        )
        self.optimizer = Optimizer(self.registry, settings.data_dir / "work")
        self.registry.on_added = self.optimizer.submit
        if Role.API in roles:
            # Variants are made where versions are uploaded (and resumed there after a restart).
            self.optimizer.start()
        self.fleet = Fleet(self.store, settings, self.broker_auth, self.signer.public_key_hex)
        self.profiles = Profiles(self.store)
        self.rollouts = Rollouts(
            self.store, self.registry, self.fleet, broadcast=settings.artifact_delivery == "broadcast"
        )
        self.telemetry = TelemetryStore(self.store)
        self.closed_loop = ClosedLoop(self.store, settings, self.telemetry, self.registry)
        # One service for the API and the maintenance tick that keeps desired states carrying them.
        self.tenants = self.closed_loop.desired.tenants
        self.transport: Transport | None = None
        self.rollout_runner: RolloutRunner | None = None
        # The singletons' leases (controller.leases), taken once the transport runs. A SQLite
        # file is this process's alone: its leases are held from the start. A process without
        # the engine role never takes them, so its rollouts service leaves every engine pass to
        # the holder (rollouts it creates or commands move at the holder's next tick).
        exclusive = self.store.path is not None
        holder = process_id()
        self.leases = {
            name: Lease(self.store, name, holder, exclusive=exclusive) for name in (ROLLOUTS, MAINTENANCE)
        }
        if Role.ENGINE not in roles:
            self.rollouts.lease = self.leases[ROLLOUTS]
        self._lease_keeper: LeaseKeeper | None = None
        self._token_hash = settings.admin_token_sha256
        self._settings_mtime = self._mtime()
        self.accounts = Accounts(
            self.store, self.admin_token_hash, lambda: self.settings.metrics_token_sha256
        )
        self.audit = AuditLog(self.store)
        self.revocations = Revocations(self.store, self.certificates, self.fleet, settings)
        self.closed_loop.extra_steps.append(("revocation list", self.revocations.refresh))

    def _mtime(self) -> int | None:
        try:
            return self.settings.settings_path.stat().st_mtime_ns
        except OSError:
            return None

    def rotate_signing_key(self) -> Signer:
        """A new signing key; every variant is re-signed, and assignments signed with it carry
        the rotation (signed by the old key) so agents learn the new key from the one they trust."""
        self.signer = self.signer.rotate()
        count = self.registry.resign_all(self.signer)
        self.fleet.controller_public_key = self.signer.public_key_hex
        log.info("variants re-signed count=%d key=%s", count, self.signer.key_id)
        return self.signer

    def sign_desired(self, device_id: str, payload: bytes) -> bytes:
        """A stored desired state signed whole with the key current now (it may have rotated)."""
        return self.signer.sign_desired_payload(device_id, payload)

    def admin_token_hash(self) -> str:
        """The current token's hash; `controller init --rotate-token` takes effect without a restart."""
        mtime = self._mtime()
        if mtime is not None and mtime != self._settings_mtime:
            try:
                self._token_hash = settings_mod.load(self.settings.data_dir).admin_token_sha256
                self._settings_mtime = mtime
                log.info("admin token reloaded path=%s", self.settings.settings_path)
            except ConfigError as exc:
                log.error("cannot reload the admin token, keeping the previous one error=%s", exc)
        return self._token_hash

    def start_transport(self) -> Transport:
        """The MQTT session, and with it what runs in the background for this process's roles."""
        engine = Role.ENGINE in self.roles
        transport = Transport(
            self.settings,
            self.fleet,
            self.telemetry,
            self.artifacts,
            sign_desired=self.sign_desired,
            # Wave broadcasts go with chunk serving: a device says it listens in a chunk request.
            wave_is_current=self.rollouts.wave_is_current if Role.CHUNKS in self.roles else None,
            username=self.account,
            subscriptions=roles_mod.subscriptions(
                self.roles, shared=self.roles != roles_mod.ALL and self.settings.mqtt_protocol == "v5"
            ),
            republish_on_connect=engine,
        )
        self.rollouts.publisher = transport
        self.transport = transport
        transport.start()
        if engine:
            self.rollouts.lease = self.leases[ROLLOUTS]
            self.closed_loop.lease = self.leases[MAINTENANCE]
            if not self.leases[ROLLOUTS].exclusive:
                # Its first step (taking the leases that are free) runs before the singletons start.
                self._lease_keeper = LeaseKeeper(list(self.leases.values()), self._lease_changed)
                self._lease_keeper.start()
            # The engine publishes desired states, so it runs only with a transport.
            self.rollout_runner = RolloutRunner(self.rollouts)
            self.rollout_runner.start()
        transport.on_capture = self.closed_loop.datasets.receive
        transport.capture_quota = CaptureQuota(
            self.store,
            self.closed_loop.datasets.staging,
            self.settings.capture_quota_bytes,
            transport.counters,
        )
        self.closed_loop.desired.publisher = transport
        self.tenants.publisher = transport
        if engine:
            self.closed_loop.start()
        log.info(
            "controller roles=%s account=%s database=%s leases=%s",
            roles_mod.describe(self.roles),
            self.account,
            self.store.where,
            ",".join(f"{n}:{'held' if lease.held else 'standby'}" for n, lease in self.leases.items())
            if engine
            else "-",
        )
        return transport

    def _lease_changed(self, lease: Lease, held: bool) -> None:
        if not held:
            return
        if lease.name == ROLLOUTS and self.transport is not None:
            # The previous holder may have committed a desired state and died before publishing it.
            self.transport.republish(f"lease {lease.name} taken")
        elif lease.name == MAINTENANCE:
            self.closed_loop.wake()

    def close(self) -> None:
        self.closed_loop.stop()
        if self.rollout_runner is not None:
            self.rollout_runner.stop()
            self.rollout_runner = None
        if self._lease_keeper is not None:
            # Released once the singletons stopped: a standby takes over at once, not in TTL_S.
            self._lease_keeper.stop()
            self._lease_keeper = None
        if self.transport is not None:
            self.transport.stop()
            self.rollouts.publisher = None
            self.tenants.publisher = None
            self.transport = None
        self.optimizer.stop()
        self.store.close()
        if self._database_lock is not None:
            self._database_lock.release()
            self._database_lock = None


@dataclass(frozen=True)
class InitOptions:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    mosquitto_passwd_file: Path | None = None
    broker_reload_command: str = ""
    mqtt_protocol: str = "v5"
    chunk_size: int = settings_mod.DEFAULT_CHUNK_SIZE
    max_upload_bytes: int = settings_mod.DEFAULT_MAX_UPLOAD_BYTES
    mqtt_tls_ca_file: Path | None = None
    # Issue the controller's own client certificate from its CA (CN edgefleet-controller),
    # for a TLS listener that takes usernames from certificates.
    mqtt_client_certificate: bool = False
    # Telemetry roll-ups and fleet-wide drift windows (controller.toml's rollup_window_s).
    rollup_window_s: int = Settings.rollup_window_s
    # The controller's database (controller.toml's database_url): empty for DATA/controller.db.
    database_url: str = ""


def broker_files(data_dir: Path) -> BrokerFiles:
    """The ready-to-run Mosquitto that ``initialise`` writes into a data folder."""
    return BrokerFiles(data_dir / "mosquitto")


def initialise(data_dir: Path, options: InitOptions) -> str:
    """Create a data folder, its broker password file and a ready-to-run Mosquitto
    configuration (:func:`broker_files`); return the admin token (shown once).

    A broker that cannot be reloaded (not started yet) is not an error: it reads the
    password file when it starts. Any other failure removes what this call wrote."""
    if settings_mod.is_initialised(data_dir):
        raise AlreadyInitialised(f"{data_dir} is already initialised (use --rotate-token for a new token)")
    broker = broker_files(data_dir)
    reload_command = options.broker_reload_command
    if not reload_command and options.mosquitto_passwd_file in (None, broker.passwd):
        reload_command = broker.reload_command()
    token = generate_token()
    mqtt_password = generate_password()
    settings = Settings(
        data_dir=data_dir,
        mqtt_password=mqtt_password,
        mqtt_password_hash=hash_password(mqtt_password),
        admin_token_sha256=hash_token(token),
        broker_host=options.broker_host,
        broker_port=options.broker_port,
        mqtt_protocol=options.mqtt_protocol,
        mosquitto_passwd_file=options.mosquitto_passwd_file,
        broker_reload_command=reload_command,
        chunk_size=options.chunk_size,
        max_upload_bytes=options.max_upload_bytes,
        rollup_window_s=options.rollup_window_s,
        database_url=options.database_url,
        mqtt_tls_ca_file=options.mqtt_tls_ca_file,
        mqtt_tls_cert_file=data_dir / "ca" / "controller.crt" if options.mqtt_client_certificate else None,
        mqtt_tls_key_file=data_dir / "ca" / "controller.key" if options.mqtt_client_certificate else None,
    )
    # Unusable TLS files are refused before anything is written (the controller's own
    # certificate is issued below, so only the broker's CA can be checked yet).
    broker_tls_context(settings.with_changes(mqtt_tls_cert_file=None, mqtt_tls_key_file=None))
    with _undo_on_failure(data_dir, settings.passwd_file):
        data_dir.mkdir(parents=True, exist_ok=True)
        _write_broker_config(broker, settings)
        controller = Controller(settings)
        try:
            if settings.mqtt_tls_cert_file is not None and settings.mqtt_tls_key_file is not None:
                controller.certificates.write_client(
                    settings.mqtt_username, settings.mqtt_tls_cert_file, settings.mqtt_tls_key_file
                )
            controller.broker_auth.write(controller.fleet.password_entries())
            try:
                controller.broker_auth.reload()
            except BrokerAuthError as exc:
                log.warning(
                    "broker not reloaded (not running yet?); it reads the file when it starts: %s", exc
                )
        finally:
            controller.close()
        # Written last: a folder whose setup failed is not "initialised".
        settings_mod.save(settings)
    log.info(
        "controller initialised data_dir=%s broker=%s:%d", data_dir, options.broker_host, options.broker_port
    )
    return token


def _write_broker_config(broker: BrokerFiles, settings: Settings) -> None:
    broker.persistence.mkdir(parents=True, exist_ok=True)
    conf = broker.render_conf(settings.broker_port, settings.broker_host, settings.passwd_file)
    atomic_write(broker.conf, conf.encode(), mode=0o644)
    atomic_write(broker.acl, ACL.encode(), mode=0o644)


@contextmanager
def _undo_on_failure(data_dir: Path, passwd_file: Path) -> Iterator[None]:
    """Remove what an interrupted ``initialise`` created, and put back a password file it replaced."""
    existed = data_dir.exists()
    before = {p.name for p in data_dir.iterdir()} if existed else set()
    try:
        old_passwd: bytes | None = passwd_file.read_bytes()
    except OSError:
        old_passwd = None
    try:
        yield
    except BaseException:
        # Cleanup never hides the error that made it necessary.
        with contextlib.suppress(OSError):
            if not existed:
                shutil.rmtree(data_dir)
            else:
                for path in data_dir.iterdir():
                    if path.name in before:
                        continue
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        with contextlib.suppress(OSError):
            if old_passwd is not None:
                atomic_write(passwd_file, old_passwd, mode=0o600)
            elif not passwd_file.is_relative_to(data_dir):
                passwd_file.unlink(missing_ok=True)
        raise


def rotate_token(data_dir: Path) -> str:
    settings = settings_mod.load(data_dir)
    token = generate_token()
    settings_mod.save(settings.with_changes(admin_token_sha256=hash_token(token)))
    log.info("admin token rotated data_dir=%s", data_dir)
    return token


def configure_tls(
    data_dir: Path, ca_file: Path, broker_port: int | None = None, client_certificate: bool = False
) -> Settings:
    """Switch an initialised controller to TLS to its broker (``controller tls``): the CA the
    broker is verified with, optionally the TLS listener's port and a client certificate of
    its own from the controller's CA. Checked before controller.toml is rewritten; a running
    server uses it from its next start."""
    settings = settings_mod.load(data_dir)
    cert_file, key_file = data_dir / "ca" / "controller.crt", data_dir / "ca" / "controller.key"
    changed = settings.with_changes(
        mqtt_tls_ca_file=ca_file,
        broker_port=broker_port or settings.broker_port,
        mqtt_tls_cert_file=cert_file if client_certificate else None,
        mqtt_tls_key_file=key_file if client_certificate else None,
    )
    broker_tls_context(changed.with_changes(mqtt_tls_cert_file=None, mqtt_tls_key_file=None))
    if client_certificate:
        CertificateAuthority.load_or_create(data_dir / "ca").write_client(
            settings.mqtt_username, cert_file, key_file
        )
    settings_mod.save(changed)
    log.info(
        "broker TLS configured data_dir=%s ca_file=%s port=%d client_certificate=%s",
        data_dir,
        ca_file,
        changed.broker_port,
        client_certificate,
    )
    return changed
