"""agent.toml -> frozen dataclasses, with errors that name the file, line and field."""

from __future__ import annotations

import grp
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from edgefleet_proto.topics import TopicError, validate_device_id

from agent.compat import tomllib
from agent.errors import ConfigError, TenantError
from agent.tenants import TenantSpec, parse_tenant

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    protocol: str = "v5"
    keepalive_s: int = 30
    # TLS: the broker's certificate is verified against this CA file. Empty means
    # plain TCP, for a broker on the device or its local network (logged as such).
    tls_ca_file: str = ""
    # A client certificate and its key (`edgefleet devices register ID --issue-cert`),
    # for a broker that takes the username from the certificate.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # More brokers ("host:port") serving the same fleet, such as the other nodes of a
    # cluster: when the current one cannot be reached the agent tries the next, in turn.
    fallback_brokers: tuple[str, ...] = ()

    def addresses(self) -> list[tuple[str, int]]:
        """``host:port`` first, then each fallback broker."""
        return [(self.host, self.port), *(split_address(b) for b in self.fallback_brokers)]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a pair; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


@dataclass(frozen=True)
class TransferConfig:
    window: int = 8
    request_timeout_s: float = 5.0


@dataclass(frozen=True)
class OutboxConfig:
    max_records: int = 10000
    # A telemetry window the controller has not acknowledged storing by then is sent again.
    ack_timeout_s: float = 30.0


@dataclass(frozen=True)
class SchedulerConfig:
    # Inference workers; 0 means one per core.
    workers: int = 0
    # onnxruntime intra-op threads per session; 0 means cores // workers, so the
    # workers together never ask for more threads than the device has cores.
    intra_op_threads: int = 0

    def resolved(self, cores: int) -> tuple[int, int]:
        workers = self.workers or max(1, cores)
        return workers, self.intra_op_threads or max(1, cores // workers)


@dataclass(frozen=True)
class PoolConfig:
    # Bytes of models the pool may hold loaded (the device profile's model budget); 0 = no limit.
    memory_budget_mb: float = 0.0
    # Seconds a model may sit unused before it is unloaded (reloaded on demand); 0 = never.
    idle_unload_s: float = 0.0


@dataclass(frozen=True)
class ApiConfig:
    # False: no local socket, and gRPC is never loaded (the largest library an agent carries
    # after its runtime); tenants then deliver their results over MQTT only.
    enabled: bool = True
    # When true every gRPC call must carry a tenant token, the default tenant's included.
    require_token: bool = False
    socket_mode: int = 0o660
    # Group given the socket (the agent must be a member), so tenant apps need not
    # share the agent's own group, which can read agent.toml.
    socket_group: str = ""


@dataclass(frozen=True)
class SecurityConfig:
    # Hex of the controller's raw Ed25519 public key, pinned at provisioning.
    controller_public_key: str = ""
    # Accept unsigned models when no key is pinned: development and protocol
    # tests only, and it must be said in so many words (logged at start).
    allow_unsigned: bool = False


@dataclass(frozen=True)
class UpdatesConfig:
    # Times an update may crash the agent while staging before it is marked failed; keep
    # it below the unit's StartLimitBurst, or systemd stops the agent first.
    max_attempts: int = 3
    # Free space (MB) downloads leave on the data disk for the agent's state and telemetry.
    reserve_mb: float = 16.0


@dataclass(frozen=True)
class AcceleratorConfig:
    # The runtime of the accelerator the device's profile declares ([[accelerators]] runtime,
    # e.g. "onnxruntime-tensorrt", "litert-edgetpu"); empty: the CPU. Used when the installed
    # runtime offers it, else the agent runs on the CPU and reports why (agent/accelerators.py).
    runtime: str = ""
    # A LiteRT delegate library other than the one the runtime's vendor installs by default.
    delegate_library: str = ""


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data_dir: Path
    socket: Path
    telemetry_interval_s: float
    mqtt: MqttConfig
    transfer: TransferConfig
    outbox: OutboxConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    pool: PoolConfig = PoolConfig()
    api: ApiConfig = ApiConfig()
    tenants: tuple[TenantSpec, ...] = ()
    security: SecurityConfig = SecurityConfig()
    updates: UpdatesConfig = UpdatesConfig()
    accelerator: AcceleratorConfig = AcceleratorConfig()


def _keys(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


# The accepted keys are the dataclasses' fields: one definition, so a field cannot
# be added without the file accepting it.
_TOP_KEYS = _keys(AgentConfig)
_SECTIONS: dict[str, type] = {
    name: kind
    for name, kind in typing.get_type_hints(AgentConfig).items()
    if isinstance(kind, type) and is_dataclass(kind)
}


class _Source:
    """The file text, to point an error at the line where a key is set."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, section: str | None, key: str) -> int | None:
        current: str | None = None
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for number, line in enumerate(self.lines, start=1):
            header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
            if header:
                current = header.group(1)
                continue
            if current == section and pattern.match(line):
                return number
        return None

    def error(self, section: str | None, key: str, problem: str) -> ConfigError:
        field = f"{section}.{key}" if section else key
        line = self.line_of(section, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {field}: {problem}")


def _get(
    src: _Source, table: dict[str, Any], section: str | None, key: str, kind: type, default: Any = None
) -> Any:
    if key not in table:
        if default is None:
            raise src.error(section, key, "missing (required)")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise src.error(section, key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _read(
    src: _Source,
    table: dict[str, Any],
    section: str,
    cls: type,
    defaults: dict[str, Any] | None = None,
    kinds: dict[str, type] | None = None,
) -> dict[str, Any]:
    """Every field of ``cls`` from ``table``: of the field's type (or ``kinds``), with the
    field's default (or ``defaults``) when absent."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        default = (defaults or {}).get(f.name, f.default)
        values[f.name] = _get(src, table, section, f.name, (kinds or {}).get(f.name, hints[f.name]), default)
    return values


def _check_keys(src: _Source, table: dict[str, Any], section: str | None, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise src.error(section, key, f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _section(src: _Source, doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise src.error(None, name, "expected a [table]")
    _check_keys(src, table, name, _keys(_SECTIONS[name]))
    return table


def load_config(path: Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read agent config: {exc.strerror or exc}") from None
    return parse_config(text, path)


def _host_has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def parse_config(
    text: str, path: Path = Path("agent.toml"), group_exists: Callable[[str], bool] = _host_has_group
) -> AgentConfig:
    """``group_exists`` answers for the device the config is for: this one, or the root that
    ``edgefleet-agent install --root`` installs into."""
    src = _Source(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    _check_keys(src, doc, None, _TOP_KEYS)

    device_id = _get(src, doc, None, "device_id", str)
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise src.error(None, "device_id", str(exc)) from None
    data_dir = Path(_get(src, doc, None, "data_dir", str)).expanduser()
    if not data_dir.is_absolute():
        data_dir = (path.parent / data_dir).resolve()
    socket = Path(_get(src, doc, None, "socket", str, str(data_dir / "inference.sock"))).expanduser()
    if not socket.is_absolute():
        socket = (path.parent / socket).resolve()
    if len(str(socket).encode()) > MAX_SOCKET_PATH:
        raise src.error(None, "socket", f"path is longer than {MAX_SOCKET_PATH} bytes: {socket}")
    interval = _get(src, doc, None, "telemetry_interval_s", float, 10.0)
    if not (math.isfinite(interval) and interval > 0):
        raise src.error(None, "telemetry_interval_s", f"must be a positive number of seconds, got {interval}")

    mqtt = _mqtt(src, doc, device_id)
    transfer = TransferConfig(**_read(src, _section(src, doc, "transfer"), "transfer", TransferConfig))
    if not 1 <= transfer.window <= 1024:
        raise src.error("transfer", "window", f"must be 1..1024, got {transfer.window}")
    if not (math.isfinite(transfer.request_timeout_s) and transfer.request_timeout_s > 0):
        raise src.error(
            "transfer", "request_timeout_s", f"must be positive, got {transfer.request_timeout_s}"
        )

    outbox = OutboxConfig(**_read(src, _section(src, doc, "outbox"), "outbox", OutboxConfig))
    if outbox.max_records < 1:
        raise src.error("outbox", "max_records", f"must be at least 1, got {outbox.max_records}")
    if not (math.isfinite(outbox.ack_timeout_s) and outbox.ack_timeout_s > 0):
        raise src.error("outbox", "ack_timeout_s", f"must be positive, got {outbox.ack_timeout_s}")

    return AgentConfig(
        device_id=device_id,
        data_dir=data_dir,
        socket=socket,
        telemetry_interval_s=interval,
        mqtt=mqtt,
        transfer=transfer,
        outbox=outbox,
        scheduler=_scheduler(src, doc),
        pool=_pool(src, doc),
        api=_api(src, doc, group_exists),
        tenants=_tenants(src, doc),
        security=_security(src, doc),
        updates=_updates(src, doc),
        accelerator=AcceleratorConfig(
            **_read(src, _section(src, doc, "accelerator"), "accelerator", AcceleratorConfig)
        ),
    )


def _updates(src: _Source, doc: dict[str, Any]) -> UpdatesConfig:
    u = _section(src, doc, "updates")
    config = UpdatesConfig(
        max_attempts=_get(src, u, "updates", "max_attempts", int, UpdatesConfig.max_attempts),
        reserve_mb=_get(src, u, "updates", "reserve_mb", float, UpdatesConfig.reserve_mb),
    )
    if not 1 <= config.max_attempts <= 100:
        raise src.error("updates", "max_attempts", f"must be 1..100, got {config.max_attempts}")
    if not (math.isfinite(config.reserve_mb) and config.reserve_mb >= 0):
        raise src.error("updates", "reserve_mb", f"must be 0 or more MB, got {config.reserve_mb}")
    return config


def _mqtt(src: _Source, doc: dict[str, Any], device_id: str) -> MqttConfig:
    m = _section(src, doc, "mqtt")
    values = _read(
        src, m, "mqtt", MqttConfig, defaults={"username": device_id}, kinds={"fallback_brokers": list}
    )
    brokers = tuple(values["fallback_brokers"])
    for address in brokers:
        try:
            split_address(address) if isinstance(address, str) else split_address("")
        except ValueError:
            raise src.error("mqtt", "fallback_brokers", f"{address!r} is not host:port") from None
    values["fallback_brokers"] = brokers
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        values[key] = _existing_file(src, "mqtt", key, values[key])
    mqtt = MqttConfig(**values)
    if not mqtt.password and not mqtt.tls_cert_file:
        raise src.error("mqtt", "password", "missing (required)")
    if not 1 <= mqtt.port <= 65535:
        raise src.error("mqtt", "port", f"must be 1..65535, got {mqtt.port}")
    if mqtt.protocol not in ("v5", "v311"):
        raise src.error("mqtt", "protocol", f"must be 'v5' or 'v311', got {mqtt.protocol!r}")
    if not 1 <= mqtt.keepalive_s <= 65535:
        raise src.error("mqtt", "keepalive_s", f"must be 1..65535 seconds, got {mqtt.keepalive_s}")
    if bool(mqtt.tls_cert_file) != bool(mqtt.tls_key_file):
        missing = "tls_key_file" if mqtt.tls_cert_file else "tls_cert_file"
        raise src.error(
            "mqtt", missing, "missing: a client certificate needs both tls_cert_file and tls_key_file"
        )
    if mqtt.tls_cert_file and not mqtt.tls_ca_file:
        raise src.error(
            "mqtt",
            "tls_ca_file",
            "missing: a client certificate is only sent over TLS, which needs the broker's CA",
        )
    return mqtt


def _existing_file(src: _Source, section: str, key: str, value: str) -> str:
    """A file path from the config, relative to the config's folder; it must exist."""
    if not value:
        return ""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (src.path.parent / path).resolve()
    if not path.is_file():
        raise src.error(section, key, f"no such file: {path}")
    return str(path)


def _security(src: _Source, doc: dict[str, Any]) -> SecurityConfig:
    values = _read(src, _section(src, doc, "security"), "security", SecurityConfig)
    key = values["controller_public_key"].strip()
    if key and not re.fullmatch(r"[0-9a-fA-F]{64}", key):
        raise src.error(
            "security",
            "controller_public_key",
            "expected 64 hex digits (the controller's raw Ed25519 public key)",
        )
    allow_unsigned = values["allow_unsigned"]
    if not key and not allow_unsigned:
        raise src.error(
            "security",
            "controller_public_key",
            "missing: the agent only runs models signed by its controller; pin the controller's key "
            "(`edgefleet devices register ID --agent-config FILE` writes it) or, for development only, "
            "set allow_unsigned = true",
        )
    return SecurityConfig(controller_public_key=key.lower(), allow_unsigned=allow_unsigned)


def _scheduler(src: _Source, doc: dict[str, Any]) -> SchedulerConfig:
    config = SchedulerConfig(**_read(src, _section(src, doc, "scheduler"), "scheduler", SchedulerConfig))
    for key in ("workers", "intra_op_threads"):
        value = getattr(config, key)
        if not 0 <= value <= 256:
            raise src.error("scheduler", key, f"must be 0 (automatic) .. 256, got {value}")
    return config


def _pool(src: _Source, doc: dict[str, Any]) -> PoolConfig:
    config = PoolConfig(**_read(src, _section(src, doc, "pool"), "pool", PoolConfig))
    for key in ("memory_budget_mb", "idle_unload_s"):
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise src.error("pool", key, f"must be 0 (off) or a positive number, got {value}")
    return config


def _api(src: _Source, doc: dict[str, Any], group_exists: Callable[[str], bool]) -> ApiConfig:
    a = _section(src, doc, "api")
    values = _read(src, a, "api", ApiConfig, defaults={"socket_mode": "0660"}, kinds={"socket_mode": str})
    mode_text = values["socket_mode"]
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise src.error(
            "api", "socket_mode", f'expected an octal mode such as "0660", got {mode_text!r}'
        ) from None
    if mode & ~0o777 or mode & 0o007:
        raise src.error("api", "socket_mode", f"must be within 0770 (no access for others), got {mode_text}")
    group = values["socket_group"]
    if group and not group_exists(group):
        raise src.error("api", "socket_group", f"no such group {group!r} on this device")
    return ApiConfig(
        enabled=values["enabled"], require_token=values["require_token"], socket_mode=mode, socket_group=group
    )


def _tenants(src: _Source, doc: dict[str, Any]) -> tuple[TenantSpec, ...]:
    tables = doc.get("tenants", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise src.error(None, "tenants", "expected [[tenants]] tables")
    tenants: list[TenantSpec] = []
    for number, table in enumerate(tables, start=1):
        try:
            tenant = parse_tenant(table, f"tenants[{number}]")
        except TenantError as exc:
            line = src.line_of("tenants", "id") if "id" not in table else _line_of_value(src, table["id"])
            where = f"{src.path}:{line}" if line else str(src.path)
            raise ConfigError(f"{where}: {exc}") from None
        if any(t.id == tenant.id for t in tenants):
            raise ConfigError(f"{src.path}: tenants[{number}]: tenant id {tenant.id!r} is declared twice")
        tenants.append(tenant)
    return tuple(tenants)


def _line_of_value(src: _Source, value: object) -> int | None:
    """The line of a tenant's ``id = ...``: where an error in its table is easiest to find."""
    pattern = re.compile(rf"^\s*id\s*=\s*[\"']{re.escape(str(value))}[\"']")
    return next((n for n, line in enumerate(src.lines, start=1) if pattern.match(line)), None)
