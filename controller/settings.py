"""The controller's settings: ``controller.toml`` in the data folder.

``controller init`` writes it once (atomically, mode 0600: it holds the
controller's own MQTT password); every other command reads it.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from controller.errors import ConfigError
from controller.files import atomic_write

SETTINGS_FILE = "controller.toml"
CONTROLLER_USER = "edgefleet-controller"
DEFAULT_CHUNK_SIZE = 65536
MAX_CHUNK_SIZE = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_MODEL_MEMORY_BYTES = DEFAULT_MAX_UPLOAD_BYTES
PROTOCOLS = ("v5", "v311")
DELIVERIES = ("broadcast", "unicast")
DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    mqtt_password: str
    mqtt_password_hash: str
    admin_token_sha256: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    mqtt_protocol: str = "v5"
    # Where the controller keeps its state: empty for the SQLite file DATA/controller.db, else a
    # URL: sqlite:///PATH, or postgresql://USER:PASSWORD@HOST:PORT/NAME for several controller
    # processes or more than one machine (docs/scaling.md).
    database_url: str = ""
    # More brokers ("host:port") serving the same fleet, such as the other nodes of a cluster
    # without a load balancer in front: when the current one cannot be reached the controller
    # tries the next, in turn, and its persistent session continues there.
    mqtt_fallback_brokers: tuple[str, ...] = ()
    mqtt_username: str = CONTROLLER_USER
    # Not sent: the broker makes the username the client id (use_username_as_clientid).
    # Kept so that controller.toml files written with it still load.
    mqtt_client_id: str = CONTROLLER_USER
    mosquitto_passwd_file: Path | None = None
    broker_reload_command: str = ""
    # TLS to the broker: its certificate is verified against this CA file; unset
    # means plain TCP (logged as unencrypted: for a broker on this machine). A
    # client certificate and key log in where the broker's TLS listener takes the
    # username from the certificate (use_identity_as_username).
    mqtt_tls_ca_file: Path | None = None
    mqtt_tls_cert_file: Path | None = None
    mqtt_tls_key_file: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    # What one uploaded model may take in memory once loaded (weights, constants it expands
    # on load, any tensor of known size); a model needing more is refused. By default no
    # more than the largest file it could have been uploaded as: expansion is the attack.
    max_model_memory_bytes: int = DEFAULT_MAX_MODEL_MEMORY_BYTES
    # Monitoring and the closed loop (docs/closed-loop.md): raw telemetry, events and drift
    # sketches are pruned after telemetry_retention_days, roll-ups after
    # rollup_retention_days; roll-ups and fleet-wide drift use windows of
    # rollup_window_s; maintenance (pruning, retraining policies) runs every
    # maintenance_interval_s; /metrics also accepts a scrape token with this hash.
    telemetry_retention_days: float = 7.0
    rollup_retention_days: float = 90.0
    rollup_window_s: int = 60
    maintenance_interval_s: float = 10.0
    metrics_token_sha256: str = ""
    # A broker cluster that asks the controller who may log in and touch which topic (EMQX's
    # HTTP authenticator and authorizer, /broker/authenticate and /broker/authorize) sends a
    # secret in the X-Broker-Secret header; this is its SHA-256 (hex). Empty: those routes answer 401.
    broker_auth_secret_sha256: str = ""
    # Per-device limits (docs/rest-api.md, "Controller limits"): artifact chunks served
    # (bytes and requests per second, each with a burst), events accepted per second,
    # and what a device may keep stored (events, telemetry bytes, captured data bytes).
    chunk_bytes_per_s: float = 8 * 1024 * 1024
    chunk_bytes_burst: int = 16 * 1024 * 1024
    chunk_requests_per_s: float = 100.0
    chunk_requests_burst: int = 200
    events_per_s: float = 2.0
    events_burst: int = 100
    # Reported states and online/offline status (the device twin): a device's newest one over
    # the rate waits and is handled once its bucket allows, older ones held back are dropped.
    reported_per_s: float = 2.0
    reported_burst: int = 30
    # A device asks for its desired state at each connection: a few a minute is plenty, and
    # each answer is a whole signed desired state, so a flood must not turn into one.
    desired_requests_per_s: float = 0.1
    desired_requests_burst: int = 5
    events_quota: int = 2000
    telemetry_quota_bytes: int = 64 * 1024 * 1024
    capture_quota_bytes: int = 512 * 1024 * 1024
    # Warnings about one device's bad messages: at most this many a second (burst 10).
    bad_message_logs_per_s: float = 1.0
    # How rollouts deliver artifacts (controller.wave_broadcast): "broadcast" sends each wave's
    # artifacts once, encrypted, on a wave topic its devices subscribe to (what a device misses
    # it asks for by request); "unicast" answers each device's requests only.
    artifact_delivery: str = "broadcast"
    # A wave's broadcast starts once all its devices sent their desired state listen, or this
    # long after the first did. Keep it below the agents' request_timeout_s (5 s by default):
    # a device that hears nothing for that long asks for its chunks instead.
    broadcast_grace_s: float = 2.0
    # Bytes a second one broadcast is paced to (0: as fast as the broker takes them).
    broadcast_bytes_per_s: float = 0.0
    # How long the broker keeps a wave's retained announcement (MQTT 5 message expiry) should
    # the controller not clear it itself when the wave ends.
    broadcast_retain_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if self.mqtt_protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt_protocol must be one of {PROTOCOLS}, not {self.mqtt_protocol!r}")
        if self.database_url and not self.database_url.startswith(DATABASE_SCHEMES):
            raise ConfigError(
                f"database_url must start with one of {', '.join(DATABASE_SCHEMES)}, not {self.database_url!r}"
            )
        if not 1 <= self.broker_port <= 65535:
            raise ConfigError(f"broker_port {self.broker_port} is not a TCP port")
        # Read from TOML as a list.
        object.__setattr__(self, "mqtt_fallback_brokers", tuple(self.mqtt_fallback_brokers))
        for address in self.mqtt_fallback_brokers:
            if _split_address(address) is None:
                raise ConfigError(f"mqtt_fallback_brokers: {address!r} is not host:port")
        if (self.mqtt_tls_cert_file is None) != (self.mqtt_tls_key_file is None):
            raise ConfigError("mqtt_tls_cert_file and mqtt_tls_key_file go together: set both or neither")
        if self.mqtt_tls_cert_file is not None and self.mqtt_tls_ca_file is None:
            raise ConfigError(
                "mqtt_tls_cert_file needs mqtt_tls_ca_file (init --mqtt-tls-ca-file FILE): "
                "a client certificate is only sent over TLS"
            )
        if not 1024 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(f"chunk_size must be between 1024 and {MAX_CHUNK_SIZE}, not {self.chunk_size}")
        if self.max_upload_bytes < 1:
            raise ConfigError("max_upload_bytes must be positive")
        if self.max_model_memory_bytes < 1:
            raise ConfigError("max_model_memory_bytes must be positive")
        if min(self.telemetry_retention_days, self.rollup_retention_days, self.maintenance_interval_s) <= 0:
            raise ConfigError("retention days and maintenance_interval_s must be positive")
        if self.rollup_window_s < 1:
            raise ConfigError("rollup_window_s must be at least 1")
        if self.artifact_delivery not in DELIVERIES:
            raise ConfigError(
                f"artifact_delivery must be one of {DELIVERIES}, not {self.artifact_delivery!r}"
            )
        if self.broadcast_grace_s < 0 or self.broadcast_bytes_per_s < 0 or self.broadcast_retain_s < 1:
            raise ConfigError(
                "broadcast_grace_s and broadcast_bytes_per_s must not be negative, broadcast_retain_s positive"
            )
        self._check_device_limits()

    def _check_device_limits(self) -> None:
        rates = (
            "chunk_bytes_per_s",
            "chunk_requests_per_s",
            "events_per_s",
            "reported_per_s",
            "desired_requests_per_s",
            "bad_message_logs_per_s",
        )
        for name in rates:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        sizes = (
            "chunk_requests_burst",
            "events_burst",
            "reported_burst",
            "desired_requests_burst",
            "events_quota",
            "telemetry_quota_bytes",
        )
        for name in (*sizes, "capture_quota_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.chunk_bytes_burst < self.chunk_size:
            raise ConfigError(
                f"chunk_bytes_burst ({self.chunk_bytes_burst}) must hold at least one chunk ({self.chunk_size})"
            )

    def broker_addresses(self) -> list[tuple[str, int]]:
        """``broker_host:broker_port`` first, then each fallback broker."""
        fallbacks = [_split_address(a) for a in self.mqtt_fallback_brokers]
        return [(self.broker_host, self.broker_port), *(a for a in fallbacks if a is not None)]

    @property
    def settings_path(self) -> Path:
        return self.data_dir / SETTINGS_FILE

    @property
    def db_path(self) -> Path:
        return self.data_dir / "controller.db"

    @property
    def database(self) -> str:
        """The database URL in force: ``database_url``, else the SQLite file :attr:`db_path`."""
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def passwd_file(self) -> Path:
        return self.mosquitto_passwd_file or self.data_dir / "mosquitto" / "passwd"

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a pair, None when malformed;
    the agent's ``[mqtt] fallback_brokers`` take the same form."""
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


# Settings stored as text and read back as paths.
_PATH_FIELDS = frozenset(f.name for f in fields(Settings) if f.name != "data_dir" and "Path" in str(f.type))


def settings_path(data_dir: Path) -> Path:
    return data_dir / SETTINGS_FILE


def is_initialised(data_dir: Path) -> bool:
    return settings_path(data_dir).exists()


def save(settings: Settings) -> None:
    doc: dict[str, str | int | float] = {}
    for key, value in asdict(settings).items():
        if key == "data_dir" or value is None:
            continue
        doc[key] = str(value) if isinstance(value, Path) else value
    atomic_write(settings.settings_path, tomli_w.dumps(doc).encode(), mode=0o600)


def load(data_dir: Path) -> Settings:
    path = settings_path(data_dir)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: run `edgefleet controller init --data-dir {data_dir}`"
        ) from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    known = {f.name for f in fields(Settings)} - {"data_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(unknown)}")
    for key in _PATH_FIELDS:
        if raw.get(key):
            raw[key] = Path(raw[key])
    try:
        return Settings(data_dir=data_dir, **raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
