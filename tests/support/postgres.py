"""A real PostgreSQL server for tests: Debian's postgresql, started in a temporary folder.

``initdb`` and ``pg_ctl`` are found on PATH or under /usr/lib/postgresql/<version>/bin (where
``apt-get install postgresql`` puts them). PostgreSQL refuses to run as root, so as root they run
as the ``postgres`` user, in a folder it owns. The server listens on a free port on 127.0.0.1 and
on a Unix socket in its folder; every test gets a database of its own (:meth:`Postgres.database`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.support.broker import free_port

SUPERUSER = "postgres"


def find_binary(name: str) -> Path | None:
    """``name`` from PATH, else from the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


class PostgresUnavailable(RuntimeError):
    pass


class Postgres:
    def __init__(self) -> None:
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise PostgresUnavailable("initdb/pg_ctl not found (apt-get install -y postgresql)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        # Not under pytest's tmp_path: its parents are mode 0700 for root, which the postgres
        # user could not traverse.
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in args]
        if self.as_root:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
        )

    def _check(self, *args: str | Path) -> None:
        done = self._run(*args)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{args[0]} failed: {done.stderr.strip()} {done.stdout.strip()} {log}")

    def start(self) -> Postgres:
        self.socket_dir.mkdir()
        if self.as_root:
            self.root.chmod(0o755)
            shutil.chown(self.root, SUPERUSER)
            shutil.chown(self.socket_dir, SUPERUSER)
        self._check(self.initdb, "-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after :meth:`pause`), on the same port and data."""
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
            # A test server: durability is not what is tested, speed is welcome.
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._check(self.pg_ctl, "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def pause(self) -> None:
        """Stop the server, dropping every connection (the database going away). A clean stop: with
        fsync and synchronous_commit off, a crash would lose transactions it had acknowledged."""
        self._check(self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = SUPERUSER) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """One statement outside a transaction (CREATE/DROP DATABASE), as the superuser."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def database(self, template: str | None = None) -> str:
        """A new empty database (a copy of ``template`` when given); its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)
