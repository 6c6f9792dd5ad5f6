"""The controller's database: SQLite (the embedded default, WAL) or PostgreSQL, through
SQLAlchemy Core, with the schema kept by controller.migrations.

Modules send plain SQL with ``?`` placeholders, written to mean the same on both: ``INSERT
... ON CONFLICT`` rather than SQLite's ``INSERT OR ...``, ``CASE`` rather than a two-argument
``max``. The store turns placeholders into the driver's and returns rows as dicts of plain
Python values (PostgreSQL's numeric sums come back as int or float, as SQLite's do).

Statements of one controller run one at a time, serialised by a lock, as on the one SQLite
connection (the modules' read-then-write steps rely on it); a thread inside
:meth:`Store.transaction` has its connection to itself and nested blocks are savepoints.
Several controller processes may share a PostgreSQL database; a SQLite file is one
controller's (controller.service holds a lock on it).

Driver errors become :class:`StoreError` here: a violated constraint
:class:`DuplicateKeyError` (the owning module turns it into a conflict), a database that
cannot be reached :class:`DatabaseUnavailable` (the API answers 503, ingest waits for it).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from controller import migrations, partitions
from controller.errors import DatabaseUnavailable, DuplicateKeyError, StoreError

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]

# How long a connection attempt to PostgreSQL may take before the database counts as unreachable.
CONNECT_TIMEOUT_S = 5
# SQLSTATE classes of a server that is gone or refusing work for now: connection exceptions,
# insufficient resources, operator intervention (shutdown), system errors.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57", "58")


def database_url(target: Path | str) -> str:
    """A database URL for ``target``: a SQLite file path, ``sqlite:///PATH`` or ``postgresql://...``."""
    if isinstance(target, Path):
        return f"sqlite:///{target.resolve()}"
    url = str(target)
    scheme = url.partition("://")[0]
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return "postgresql+psycopg://" + url.partition("://")[2]
    if scheme == "sqlite":
        return url
    raise StoreError(f"unsupported database {redact(url)!r}: use sqlite:///PATH or postgresql://HOST/NAME")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url.split("@")[-1]


def check_url(url: str) -> str:
    """``url`` when the controller can use it (refused with a clear error otherwise)."""
    try:
        parsed = make_url(database_url(url))
    except exc.ArgumentError as error:
        raise StoreError(f"cannot read the database URL {redact(url)!r}: {error}") from None
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        raise StoreError("a SQLite database URL names its file: sqlite:///PATH")
    if parsed.get_backend_name() == "postgresql" and not parsed.database:
        raise StoreError("a PostgreSQL database URL names its database: postgresql://USER@HOST/NAME")
    return url


@functools.lru_cache(maxsize=2048)
def _pyformat(sql: str, with_params: bool) -> str:
    """``?`` placeholders as psycopg's ``%s`` (``%`` doubled when there are parameters), outside
    quoted strings and identifiers."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            quote = "" if ch == quote else quote
            out.append("%%" if ch == "%" and with_params else ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%" and with_params:
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


def _param(value: Any) -> Any:
    # A bool is a 0/1 integer column on both (PostgreSQL refuses a boolean for an integer).
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def _value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


class Store:
    def __init__(self, target: Path | str) -> None:
        self.url = database_url(target)
        parsed = make_url(self.url)
        self.backend = parsed.get_backend_name()
        self.where = redact(self.url)
        self.path = Path(parsed.database) if self.backend == "sqlite" and parsed.database else None
        self._lock = threading.RLock()
        self._local = threading.local()
        self.engine = self._engine()
        try:
            migrations.upgrade(self.engine, self.where)
        except migrations.NewerDatabase:
            self.engine.dispose()
            raise
        except (exc.SQLAlchemyError, OSError) as error:
            self.engine.dispose()
            raise self.translate(error, f"cannot open {self.where}") from None
        self.partitions = partitions.Partitions(self)

    @property
    def is_postgresql(self) -> bool:
        return self.backend == "postgresql"

    def _engine(self) -> Engine:
        if self.backend == "sqlite":
            engine = sa.create_engine(
                self.url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False, "timeout": 30},
            )
            event.listen(engine, "connect", _sqlite_connected)
            # pysqlite's own implicit transactions skip SAVEPOINTs; SQLAlchemy's recipe: BEGIN ourselves.
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
            return engine
        return sa.create_engine(
            self.url,
            pool_size=2,
            max_overflow=4,
            # A connection the server dropped (a restart, a failover) is replaced, not handed out.
            pool_pre_ping=True,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "edgefleet-controller"},
        )

    def translate(self, error: BaseException, what: str) -> StoreError:
        if isinstance(error, exc.IntegrityError):
            return DuplicateKeyError(f"constraint failed: {error.orig}")
        if _unavailable(error):
            detail = getattr(error, "orig", None) or error
            return DatabaseUnavailable(f"the database {self.where} cannot be reached: {_first_line(detail)}")
        detail = getattr(error, "orig", None) or error
        return StoreError(f"{what}: {detail}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except exc.SQLAlchemyError as error:
            raise self.translate(error, "database error") from None

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """The thread's connection in its transaction, else one for a single statement."""
        current: Connection | None = getattr(self._local, "connection", None)
        if current is not None:
            yield current
            return
        with self._errors(), self.engine.begin() as connection:
            yield connection

    @contextmanager
    def transaction(self, apart: bool = False) -> Iterator[Store]:
        """Everything inside commits together or not at all; nested blocks are savepoints.

        ``apart`` (PostgreSQL): on a pooled connection of the thread's own, not serialised with
        this controller's other statements, for work that must not wait behind a long ingest
        batch (a lease renewal, controller.leases). SQLite has one connection: an ordinary one."""
        if apart and self.is_postgresql and not self.in_transaction():
            with self._errors(), self.engine.connect() as connection:
                self._local.connection, self._local.apart = connection, True
                try:
                    with connection.begin():
                        yield self
                finally:
                    self._local.connection, self._local.apart = None, False
            return
        with self._lock:
            current: Connection | None = getattr(self._local, "connection", None)
            if current is not None:
                with self._errors(), current.begin_nested():
                    yield self
                return
            with self._errors(), self.engine.connect() as connection:
                self._local.connection = connection
                try:
                    with connection.begin():
                        yield self
                finally:
                    self._local.connection = None

    def _serialised(self) -> AbstractContextManager[object]:
        """The statement lock, but inside an ``apart`` transaction (a connection of its own)."""
        return nullcontext() if getattr(self._local, "apart", False) else self._lock

    def in_transaction(self) -> bool:
        """Whether this thread is inside :meth:`transaction`."""
        return getattr(self._local, "connection", None) is not None

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one write statement; returns the rowcount."""
        with self._serialised(), self._connection() as connection, self._errors():
            result = connection.exec_driver_sql(*self._statement(connection, sql, params))
            return int(result.rowcount)

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._serialised(), self._connection() as connection, self._errors():
            result = connection.exec_driver_sql(*self._statement(connection, sql, params))
            return [{k: _value(v) for k, v in row.items()} for row in result.mappings()]

    def query_one(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], on_conflict: str = ""
    ) -> int:
        """Many rows in one multi-row INSERT per chunk, or one COPY on PostgreSQL when no
        ``on_conflict`` is given (one round trip either way on PostgreSQL);
        ``on_conflict`` is the statement's ``ON CONFLICT ...`` clause, if any (two rows of one
        statement must then not conflict with each other: PostgreSQL refuses that)."""
        if self.is_postgresql and not on_conflict and rows:
            return self._copy(table, columns, rows)
        count = 0
        # SQLite allows 32766 parameters a statement; stay well below.
        per_statement = max(1, 2000 // max(1, len(columns)))
        placeholders = "(" + ", ".join("?" for _ in columns) + ")"
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                + ", ".join(placeholders for _ in chunk)
                + (f" {on_conflict}" if on_conflict else "")
            )
            count += self.execute(sql, [value for row in chunk for value in row])
        return count

    def _copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """The rows through PostgreSQL's COPY, in the caller's transaction. Its text is the same
        whatever the rows' number; a multi-row INSERT's is new for every batch size, and psycopg
        parsed each one's thousands of placeholders again (a third of ingest's CPU)."""
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with self._serialised(), self._connection() as connection, self._errors():
            driver = connection.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:
                with driver.cursor() as cursor, cursor.copy(sql) as copy:
                    for row in rows:
                        copy.write_row([_param(v) for v in row])
            except psycopg.Error as error:
                wrapped = exc.DBAPIError.instance(sql, None, error, psycopg.Error)
                raise self.translate(wrapped, "database error") from None
        return len(rows)

    def _statement(self, connection: Connection, sql: str, params: Params) -> tuple[str, Any]:
        if isinstance(params, Mapping):
            converted: Any = {k: _param(v) for k, v in params.items()}
        else:
            converted = tuple(_param(v) for v in params)
        if connection.dialect.name == "postgresql":
            if isinstance(params, Mapping):
                raise StoreError("named parameters are not portable: use ? placeholders")
            sql = _pyformat(sql, bool(converted))
        return sql, converted

    def lock(self, name: str) -> None:
        """Hold the lock called ``name`` until the current transaction ends, against other
        controller processes sharing the database (PostgreSQL; a SQLite file has one)."""
        self.lock_many([name])

    def lock_many(self, names: Sequence[str]) -> None:
        """:meth:`lock` on each of ``names`` in their sorted order (two transactions that take
        overlapping sets never wait for each other in a circle), in one round trip."""
        if not self.is_postgresql or not names:
            return
        ordered = sorted(set(names))
        # A VALUES list is scanned in its order, so the locks are taken in that order.
        self.query(
            "SELECT pg_advisory_xact_lock(hashtext(k)) AS locked FROM (VALUES "
            + ", ".join("(?)" for _ in ordered)
            + ") AS v(k)",
            ordered,
        )

    def journal_mode(self) -> str:
        if self.backend != "sqlite":
            return ""
        row = self.query_one("PRAGMA journal_mode")
        return str(row["journal_mode"]) if row else ""

    def wait_available(self, timeout: float) -> bool:
        """Whether the database answers within ``timeout`` seconds (tried about once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.query_one("SELECT 1 AS one")
                return True
            except DatabaseUnavailable:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        with self._lock:
            self.engine.dispose()


def _sqlite_connected(dbapi_connection: Any, record: Any) -> None:
    # SQLAlchemy's BEGIN (see Store._engine) instead of the driver's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _unavailable(error: BaseException) -> bool:
    """A database that is gone for now (not a statement it refused)."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.InterfaceError):
        return True
    orig = getattr(error, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    # psycopg raises OperationalError without an SQLSTATE when it cannot connect at all.
    return isinstance(error, exc.OperationalError) and type(orig).__module__.startswith("psycopg")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
