"""The controller's schema history (Alembic revisions in ``versions/``), applied at start.

One history for SQLite and PostgreSQL. :func:`upgrade` brings a database to the newest
revision this code knows; a database made before migrations is adopted by the baseline
revision (it adds what is missing and keeps every row). A database at a revision this code
does not know was migrated by a newer controller: it is refused, naming both revisions, and
left as it is.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from controller.errors import StoreError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# Any constant: several controllers sharing a PostgreSQL database migrate one at a time.
_MIGRATION_LOCK = 0x4546_4D49


class NewerDatabase(StoreError):
    """The database was migrated by a newer controller than this one."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    return config


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    """The head revision and every revision of the history (read once per process)."""
    script = ScriptDirectory.from_config(_config())
    head = script.get_current_head()
    if head is None:
        raise StoreError(f"no migrations under {HERE}")
    return head, frozenset(s.revision for s in script.walk_revisions())


def head() -> str:
    return _revisions()[0]


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, where: str) -> None:
    """Migrate the database of ``engine`` (described as ``where`` in messages) to :func:`head`."""
    newest, known = _revisions()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        found = current(connection)
        if found == newest:
            return
        if found is not None and found not in known:
            raise NewerDatabase(
                f"{where} is at schema revision {found}, which this controller does not know (its newest is "
                f"{newest}): it was migrated by a newer EdgeFleet. Upgrade this controller, or point it at "
                "another database; nothing was changed"
            )
        config = _config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database migrated where=%s from=%s to=%s", where, found or "none", newest)
