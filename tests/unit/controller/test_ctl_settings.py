from __future__ import annotations

from pathlib import Path

import pytest

from controller import settings as settings_mod
from controller.errors import ConfigError
from controller.settings import Settings


def make(tmp_path: Path, **changes: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": tmp_path,
        "mqtt_password": 'pa"ss\\word\n',
        "mqtt_password_hash": "$7$101$a$b",
        "admin_token_sha256": "ab" * 32,
    }
    return Settings(**{**base, **changes})  # type: ignore[arg-type]


def test_round_trip_through_controller_toml(tmp_path: Path) -> None:
    original = make(
        tmp_path,
        broker_port=18830,
        mqtt_protocol="v311",
        mosquitto_passwd_file=tmp_path / "pw",
        broker_reload_command="kill -HUP 12",
    )
    settings_mod.save(original)
    assert original.settings_path.stat().st_mode & 0o777 == 0o600
    assert settings_mod.load(tmp_path) == original


def test_missing_and_invalid_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="controller init"):
        settings_mod.load(tmp_path)
    (tmp_path / "controller.toml").write_text("broker_port = [\n")
    with pytest.raises(ConfigError, match="cannot read"):
        settings_mod.load(tmp_path)
    (tmp_path / "controller.toml").write_text('mqtt_password = "x"\nsurprise = 1\n')
    with pytest.raises(ConfigError, match="surprise"):
        settings_mod.load(tmp_path)
    with pytest.raises(ConfigError, match="mqtt_protocol"):
        make(tmp_path, mqtt_protocol="v4")
    with pytest.raises(ConfigError, match="chunk_size"):
        make(tmp_path, chunk_size=10)


def test_artifact_delivery_is_broadcast_or_unicast_with_sane_broadcast_settings(tmp_path: Path) -> None:
    assert make(tmp_path).artifact_delivery == "broadcast"
    assert make(tmp_path, artifact_delivery="unicast").artifact_delivery == "unicast"
    for bad in (
        {"artifact_delivery": "multicast"},
        {"broadcast_grace_s": -1.0},
        {"broadcast_bytes_per_s": -1.0},
        {"broadcast_retain_s": 0},
    ):
        with pytest.raises(ConfigError, match=r"artifact_delivery|broadcast_"):
            make(tmp_path, **bad)
