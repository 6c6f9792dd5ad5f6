"""agent.toml accepts exactly the fields of the config dataclasses, and each one it
accepts is read into the config (none accepted and then ignored)."""

from __future__ import annotations

import grp
import os
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config
from agent.errors import ConfigError

BASE = 'device_id = "cam-1"\ndata_dir = "/var/lib/agent"\n'


def sections() -> dict[str, type]:
    hints = typing.get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in fields(AgentConfig) if is_dataclass(hints[f.name])}


def samples(tmp_path: Path) -> dict[tuple[str, str], tuple[str, Any]]:
    """(section, key) -> (TOML value, the value the config must then hold), none a default."""
    pem = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in pem.values():
        path.write_text("-")
    return {
        ("mqtt", "host"): ('"broker.example"', "broker.example"),
        ("mqtt", "port"): ("8884", 8884),
        ("mqtt", "username"): ('"someone"', "someone"),
        ("mqtt", "password"): ('"other"', "other"),
        ("mqtt", "protocol"): ('"v311"', "v311"),
        ("mqtt", "keepalive_s"): ("45", 45),
        ("mqtt", "tls_ca_file"): ('"ca.pem"', str(pem["ca"])),
        ("mqtt", "tls_cert_file"): ('"cert.pem"', str(pem["cert"])),
        ("mqtt", "tls_key_file"): ('"key.pem"', str(pem["key"])),
        ("mqtt", "fallback_brokers"): ('["node-2:1883", "[::1]:8883"]', ("node-2:1883", "[::1]:8883")),
        ("transfer", "window"): ("16", 16),
        ("transfer", "request_timeout_s"): ("2.5", 2.5),
        ("outbox", "max_records"): ("50", 50),
        ("outbox", "ack_timeout_s"): ("12.5", 12.5),
        ("scheduler", "workers"): ("2", 2),
        ("scheduler", "intra_op_threads"): ("3", 3),
        ("pool", "memory_budget_mb"): ("100.0", 100.0),
        ("pool", "idle_unload_s"): ("5", 5.0),
        ("api", "enabled"): ("false", False),
        ("api", "require_token"): ("true", True),
        ("api", "socket_mode"): ('"0640"', 0o640),
        ("api", "socket_group"): (
            f'"{grp.getgrgid(os.getgid()).gr_name}"',
            grp.getgrgid(os.getgid()).gr_name,
        ),
        ("security", "controller_public_key"): (f'"{"ab" * 32}"', "ab" * 32),
        ("security", "allow_unsigned"): ("true", True),
        ("updates", "max_attempts"): ("5", 5),
        ("updates", "reserve_mb"): ("32", 32.0),
        ("accelerator", "runtime"): ('"onnxruntime-tensorrt"', "onnxruntime-tensorrt"),
        ("accelerator", "delegate_library"): ('"/opt/vx/libvx_delegate.so"', "/opt/vx/libvx_delegate.so"),
    }


def config_text(values: dict[str, dict[str, str]]) -> str:
    values.setdefault("mqtt", {}).setdefault("password", '"secret"')
    values.setdefault("security", {}).setdefault("allow_unsigned", "true")
    tables = [
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for name, keys in values.items()
    ]
    return BASE + "\n".join(tables)


def test_every_dataclass_field_has_a_sample(tmp_path: Path) -> None:
    declared = {(name, f.name) for name, cls in sections().items() for f in fields(cls)}
    assert declared == set(samples(tmp_path))


# Keys that only make sense together.
COMPANIONS = {
    ("mqtt", "tls_cert_file"): ("tls_key_file", "tls_ca_file"),
    ("mqtt", "tls_key_file"): ("tls_cert_file", "tls_ca_file"),
}


def test_every_dataclass_field_is_accepted_and_read(tmp_path: Path) -> None:
    values = samples(tmp_path)
    for (section, key), (toml_value, expected) in values.items():
        table = {key: toml_value} | {k: values[section, k][0] for k in COMPANIONS.get((section, key), ())}
        config = parse_config(config_text({section: table}), tmp_path / "agent.toml")
        assert getattr(getattr(config, section), key) == expected, f"{section}.{key}"


def test_keepalive_is_read_from_the_mqtt_table() -> None:
    config = parse_config(config_text({"mqtt": {"keepalive_s": "45"}}))
    assert config.mqtt.keepalive_s == 45


@pytest.mark.parametrize("section", sorted(sections()))
def test_an_unknown_key_is_refused_naming_it(section: str) -> None:
    text = config_text({section: {"colour": '"blue"'}})
    with pytest.raises(
        ConfigError, match=rf"agent\.toml:\d+: {section}\.colour: unknown key \(expected one of "
    ):
        parse_config(text, Path("agent.toml"))


def test_an_unknown_top_level_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=re.escape("agent.toml:3: colour: unknown key")):
        parse_config(BASE + 'colour = "blue"\n' + config_text({}).removeprefix(BASE), Path("agent.toml"))
