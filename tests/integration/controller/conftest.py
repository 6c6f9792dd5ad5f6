"""A controller (FastAPI app + MQTT transport) over a real mosquitto, real SQLite
and real model files; device-side peers are plain paho clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, running
from tests.support.models import digits_classifier


@pytest.fixture
def ctl(broker: Broker, tmp_path: Path, store_url: str) -> Iterator[Ctl]:
    settings, token = init_controller(broker, tmp_path / "controller", database_url=store_url)
    with running(broker, settings, token) as c:
        yield c


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_classifier(tmp_path_factory.mktemp("models") / "digits.onnx").path
