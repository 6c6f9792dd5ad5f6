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
PROTOCOLS = ("v5", "v311")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    mqtt_password: str
    mqtt_password_hash: str
    admin_token_sha256: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    mqtt_protocol: str = "v5"
    mqtt_username: str = CONTROLLER_USER
    # Not sent: the broker makes the username the client id (use_username_as_clientid).
    # Kept so that controller.toml files written with it still load.
    mqtt_client_id: str = CONTROLLER_USER
    mosquitto_passwd_file: Path | None = None
    broker_reload_command: str = ""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    # Monitoring and the closed loop (issue 6): raw telemetry, events and drift
    # sketches are pruned after telemetry_retention_days, roll-ups after
    # rollup_retention_days; roll-ups and fleet-wide drift use windows of
    # rollup_window_s; maintenance (pruning, retraining policies) runs every
    # maintenance_interval_s; /metrics also accepts a scrape token with this hash.
    telemetry_retention_days: float = 7.0
    rollup_retention_days: float = 90.0
    rollup_window_s: int = 60
    maintenance_interval_s: float = 10.0
    metrics_token_sha256: str = ""

    def __post_init__(self) -> None:
        if self.mqtt_protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt_protocol must be one of {PROTOCOLS}, not {self.mqtt_protocol!r}")
        if not 1 <= self.broker_port <= 65535:
            raise ConfigError(f"broker_port {self.broker_port} is not a TCP port")
        if not 1024 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(f"chunk_size must be between 1024 and {MAX_CHUNK_SIZE}, not {self.chunk_size}")
        if self.max_upload_bytes < 1:
            raise ConfigError("max_upload_bytes must be positive")
        if min(self.telemetry_retention_days, self.rollup_retention_days, self.maintenance_interval_s) <= 0:
            raise ConfigError("retention days and maintenance_interval_s must be positive")
        if self.rollup_window_s < 1:
            raise ConfigError("rollup_window_s must be at least 1")

    @property
    def settings_path(self) -> Path:
        return self.data_dir / SETTINGS_FILE

    @property
    def db_path(self) -> Path:
        return self.data_dir / "controller.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def passwd_file(self) -> Path:
        return self.mosquitto_passwd_file or self.data_dir / "mosquitto" / "passwd"

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)


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
    if raw.get("mosquitto_passwd_file"):
        raw["mosquitto_passwd_file"] = Path(raw["mosquitto_passwd_file"])
    try:
        return Settings(data_dir=data_dir, **raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
