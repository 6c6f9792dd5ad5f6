from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError

# Protocol tests run without a signing controller; say so explicitly.
UNSIGNED = "[security]\nallow_unsigned = true\n"

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

[security]
allow_unsigned = true
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
    cfg = parse_config('device_id = "d"\ndata_dir = "/d"\n[mqtt]\npassword = "p"\n' + UNSIGNED)
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
    path.write_text('device_id = "d"\ndata_dir = "data"\n[mqtt]\npassword = "p"\n' + UNSIGNED)
    assert load_config(path).data_dir == tmp_path / "data"


TENANTS = """\
device_id = "cam-1"
data_dir = "/var/lib/edgefleet-agent"
[mqtt]
password = "p"
[security]
allow_unsigned = true
[scheduler]
workers = 2
[pool]
memory_budget_mb = 64
idle_unload_s = 300
[api]
require_token = true
socket_mode = "0640"

[[tenants]]
id = "door"
model = "person-detect"
token = "door-token-0123456789"
weight = 3
queue = 2
rate_hz = 15
results = ["grpc", "mqtt"]
[tenants.source]
kind = "video"
uri = "/srv/door.avi"
loop = true
[tenants.preprocess]
resize = [32, 32]
color = "rgb"
scale = 0.00392156862745098
layout = "nchw"

[[tenants]]
id = "keyword"
[tenants.source]
kind = "wav"
uri = "speech.wav"
[tenants.preprocess]
window = 16000
hop = 8000
features = "log_mel"
"""


def test_tenants_scheduler_pool_and_api_sections() -> None:
    from agent.tenants import hash_token

    cfg = parse_config(TENANTS, Path("/etc/edgefleet/agent.toml"))
    assert cfg.scheduler.resolved(4) == (2, 2) and cfg.scheduler.resolved(1) == (2, 1)
    assert (cfg.pool.memory_budget_mb, cfg.pool.idle_unload_s) == (64.0, 300.0)
    assert (cfg.api.require_token, cfg.api.socket_mode) == (True, 0o640)
    door, keyword = cfg.tenants
    assert (door.id, door.model, door.weight, door.queue, door.rate_hz) == (
        "door",
        "person-detect",
        3.0,
        2,
        15.0,
    )
    assert door.results == {"grpc", "mqtt"} and door.token_sha256 == hash_token("door-token-0123456789")
    assert door.accepts("door-token-0123456789") and not door.accepts("door-token-0123456780")
    assert door.source is not None and door.source.flag("loop") and door.source.uri == "/srv/door.avi"
    assert door.preprocess.resize == (32, 32) and door.preprocess.layout == "nchw"
    assert keyword.preprocess.features == "log_mel" and keyword.preprocess.window == 16000
    assert not keyword.token_sha256 and keyword.weight == 1.0 and keyword.results == {"grpc"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('kind = "video"', 'kind = "hologram"'), "tenants[1] 'door'.source.kind: must be one of"),
        (("loop = true", "loop = true\nexposure = 3"), "unknown option(s) ['exposure'] for a video source"),
        (("weight = 3", "weight = 0"), "tenants[1] 'door'.weight: must be greater than 0"),
        (("resize = [32, 32]", "resize = [32]"), "preprocess.resize: expected 2 non-negative integers"),
        (('results = ["grpc", "mqtt"]', 'results = ["email"]'), "results: must be some of grpc, mqtt"),
        (('token = "door-token-0123456789"', 'token = "short"'), "token: use a random string of at least 16"),
        (('id = "keyword"', 'id = "door"'), "tenant id 'door' is declared twice"),
        (('id = "keyword"', 'id = "key.word"'), "invalid tenant id 'key.word'"),
        (('socket_mode = "0640"', 'socket_mode = "0666"'), "api.socket_mode: must be within 0770"),
        (("workers = 2", "workers = -1"), "scheduler.workers: must be 0 (automatic) .. 256"),
        (('socket_mode = "0640"', 'socket_group = "no-such-group-ef"'), "api.socket_group: no such group"),
    ],
)
def test_bad_tenant_declarations_name_the_problem(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(TENANTS.replace(*edit, 1), Path("agent.toml"))
    assert message in str(err.value)
    assert str(err.value).startswith("agent.toml")
