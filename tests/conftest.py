from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on a free port, configured from deploy/mosquitto/."""
    b = Broker(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()
