"""agent.toml -> frozen dataclasses, with errors that name the file, line and field."""

from __future__ import annotations

import grp
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet_proto.topics import TopicError, validate_device_id

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


@dataclass(frozen=True)
class TransferConfig:
    window: int = 8
    request_timeout_s: float = 5.0


@dataclass(frozen=True)
class OutboxConfig:
    max_records: int = 10000


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


_TOP_KEYS = {
    "device_id",
    "data_dir",
    "socket",
    "telemetry_interval_s",
    "mqtt",
    "transfer",
    "outbox",
    "scheduler",
    "pool",
    "api",
    "tenants",
    "security",
}
_SECTION_KEYS = {
    "mqtt": {"host", "port", "username", "password", "protocol"},
    "transfer": {"window", "request_timeout_s"},
    "outbox": {"max_records"},
    "scheduler": {"workers", "intra_op_threads"},
    "pool": {"memory_budget_mb", "idle_unload_s"},
    "api": {"require_token", "socket_mode", "socket_group"},
    "security": {"controller_public_key", "allow_unsigned"},
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


def _check_keys(src: _Source, table: dict[str, Any], section: str | None, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise src.error(section, key, f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _section(src: _Source, doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise src.error(None, name, "expected a [table]")
    _check_keys(src, table, name, _SECTION_KEYS[name])
    return table


def load_config(path: Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read agent config: {exc.strerror or exc}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path = Path("agent.toml")) -> AgentConfig:
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

    m = _section(src, doc, "mqtt")
    mqtt = MqttConfig(
        host=_get(src, m, "mqtt", "host", str, "127.0.0.1"),
        port=_get(src, m, "mqtt", "port", int, 1883),
        username=_get(src, m, "mqtt", "username", str, device_id),
        password=_get(src, m, "mqtt", "password", str),
        protocol=_get(src, m, "mqtt", "protocol", str, "v5"),
    )
    if not 1 <= mqtt.port <= 65535:
        raise src.error("mqtt", "port", f"must be 1..65535, got {mqtt.port}")
    if mqtt.protocol not in ("v5", "v311"):
        raise src.error("mqtt", "protocol", f"must be 'v5' or 'v311', got {mqtt.protocol!r}")

    t = _section(src, doc, "transfer")
    transfer = TransferConfig(
        window=_get(src, t, "transfer", "window", int, 8),
        request_timeout_s=_get(src, t, "transfer", "request_timeout_s", float, 5.0),
    )
    if not 1 <= transfer.window <= 1024:
        raise src.error("transfer", "window", f"must be 1..1024, got {transfer.window}")
    if not (math.isfinite(transfer.request_timeout_s) and transfer.request_timeout_s > 0):
        raise src.error(
            "transfer", "request_timeout_s", f"must be positive, got {transfer.request_timeout_s}"
        )

    o = _section(src, doc, "outbox")
    outbox = OutboxConfig(max_records=_get(src, o, "outbox", "max_records", int, 10000))
    if outbox.max_records < 1:
        raise src.error("outbox", "max_records", f"must be at least 1, got {outbox.max_records}")

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
        api=_api(src, doc),
        tenants=_tenants(src, doc),
        security=_security(src, doc),
    )


def _security(src: _Source, doc: dict[str, Any]) -> SecurityConfig:
    s = _section(src, doc, "security")
    key = _get(src, s, "security", "controller_public_key", str, "").strip()
    if key and not re.fullmatch(r"[0-9a-fA-F]{64}", key):
        raise src.error(
            "security",
            "controller_public_key",
            "expected 64 hex digits (the controller's raw Ed25519 public key)",
        )
    allow_unsigned = _get(src, s, "security", "allow_unsigned", bool, False)
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
    s = _section(src, doc, "scheduler")
    config = SchedulerConfig(
        workers=_get(src, s, "scheduler", "workers", int, 0),
        intra_op_threads=_get(src, s, "scheduler", "intra_op_threads", int, 0),
    )
    for key in ("workers", "intra_op_threads"):
        value = getattr(config, key)
        if not 0 <= value <= 256:
            raise src.error("scheduler", key, f"must be 0 (automatic) .. 256, got {value}")
    return config


def _pool(src: _Source, doc: dict[str, Any]) -> PoolConfig:
    p = _section(src, doc, "pool")
    config = PoolConfig(
        memory_budget_mb=_get(src, p, "pool", "memory_budget_mb", float, 0.0),
        idle_unload_s=_get(src, p, "pool", "idle_unload_s", float, 0.0),
    )
    for key in ("memory_budget_mb", "idle_unload_s"):
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise src.error("pool", key, f"must be 0 (off) or a positive number, got {value}")
    return config


def _api(src: _Source, doc: dict[str, Any]) -> ApiConfig:
    a = _section(src, doc, "api")
    mode_text = _get(src, a, "api", "socket_mode", str, "0660")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise src.error(
            "api", "socket_mode", f'expected an octal mode such as "0660", got {mode_text!r}'
        ) from None
    if mode & ~0o777 or mode & 0o007:
        raise src.error("api", "socket_mode", f"must be within 0770 (no access for others), got {mode_text}")
    group = _get(src, a, "api", "socket_group", str, "")
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise src.error("api", "socket_group", f"no such group {group!r} on this device") from None
    return ApiConfig(
        require_token=_get(src, a, "api", "require_token", bool, False), socket_mode=mode, socket_group=group
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
