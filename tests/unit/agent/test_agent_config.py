from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError

GOOD = """\
device_id = "cam-1"
data_dir = "/var/lib/edgefleet-agent"
telemetry_interval_s = 10

[mqtt]
host = "broker.local"
port = 8883
username = "cam-1"
password = "secret"
protocol = "v311"

[transfer]
window = 8
request_timeout_s = 5.0

[outbox]
max_records = 100
"""


def test_full_config_parses_into_frozen_dataclasses() -> None:
    cfg = parse_config(GOOD, Path("/etc/edgefleet/agent.toml"))
    assert cfg.device_id == "cam-1"
    assert cfg.socket == Path("/var/lib/edgefleet-agent/inference.sock")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.protocol) == ("broker.local", 8883, "v311")
    assert cfg.telemetry_interval_s == 10.0
    assert (cfg.transfer.window, cfg.outbox.max_records) == (8, 100)
    with pytest.raises(AttributeError):
        cfg.device_id = "x"  # type: ignore[misc]


def test_minimal_config_uses_documented_defaults() -> None:
    cfg = parse_config('device_id = "d"\ndata_dir = "/d"\n[mqtt]\npassword = "p"\n')
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.mqtt.protocol) == (
        "127.0.0.1",
        1883,
        "d",
        "v5",
    )
    assert (cfg.transfer.window, cfg.transfer.request_timeout_s, cfg.outbox.max_records) == (8, 5.0, 10000)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("port = 8883", 'port = "x"'), "agent.toml:7: mqtt.port: expected int, got str 'x'"),
        (("port = 8883", "port = 0"), "agent.toml:7: mqtt.port: must be 1..65535, got 0"),
        (('protocol = "v311"', 'protocol = "v4"'), "agent.toml:10: mqtt.protocol: must be 'v5' or 'v311'"),
        (('password = "secret"\n', ""), "agent.toml: mqtt.password: missing (required)"),
        (('device_id = "cam-1"', 'device_id = "a/b"'), "agent.toml:1: device_id: invalid device id 'a/b'"),
        (("window = 8", "window = 0"), "agent.toml:13: transfer.window: must be 1..1024, got 0"),
        (
            ("max_records = 100", "max_records = true"),
            "agent.toml:17: outbox.max_records: expected int, got bool",
        ),
        (
            ("telemetry_interval_s = 10", "telemetry_interval_s = -1"),
            "telemetry_interval_s: must be a positive",
        ),
        (("[outbox]", "[outbox]\nmax_record = 5"), "agent.toml:17: outbox.max_record: unknown key"),
        (
            ("[mqtt]", "[mqtt\n"),
            "agent.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 5",
        ),
    ],
)
def test_errors_name_line_and_field(change: tuple[str, str], expected: str) -> None:
    text = GOOD.replace(*change)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(text, Path("agent.toml"))


def test_socket_path_too_long_for_a_unix_socket() -> None:
    text = GOOD.replace("telemetry_interval_s = 10", f'socket = "/{"s" * 120}"')
    with pytest.raises(ConfigError, match="socket: path is longer than 107 bytes"):
        parse_config(text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_config(tmp_path / "nope.toml")


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d"\ndata_dir = "data"\n[mqtt]\npassword = "p"\n')
    assert load_config(path).data_dir == tmp_path / "data"
