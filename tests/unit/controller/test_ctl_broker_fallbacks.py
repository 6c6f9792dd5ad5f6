"""The controller's fallback brokers: the other nodes of a cluster, tried in turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import settings as settings_mod
from controller.errors import ConfigError
from controller.settings import Settings


def make(tmp_path: Path, **changes: object) -> Settings:
    return Settings(tmp_path, "pw", "hash", "token", broker_host="node-1", broker_port=1883, **changes)  # type: ignore[arg-type]


def test_fallback_brokers_follow_the_broker_and_survive_a_save_and_load(tmp_path: Path) -> None:
    settings = make(tmp_path, mqtt_fallback_brokers=["node-2:1883", "[::1]:8883"])
    assert settings.broker_addresses() == [("node-1", 1883), ("node-2", 1883), ("::1", 8883)]
    settings_mod.save(settings)
    assert settings_mod.load(tmp_path).broker_addresses() == settings.broker_addresses()
    assert make(tmp_path).broker_addresses() == [("node-1", 1883)]


@pytest.mark.parametrize("bad", ["node-2", "node-2:", ":1883", "node-2:99999", "node-2:port"])
def test_a_malformed_fallback_broker_is_refused_naming_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"mqtt_fallback_brokers: '{bad}' is not host:port"):
        make(tmp_path, mqtt_fallback_brokers=[bad])
