"""One controller per SQLite file: a lock on ``<file>.lock`` held for the process's lifetime.

A SQLite database is one process's (several would fight over its writes and each keep its own
caches); controllers that share a database run on PostgreSQL. The lock is an ``flock``, so a
controller that dies, however it dies, leaves none behind; the file names the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from controller.errors import ConfigError


class DatabaseLocked(ConfigError):
    pass


class DatabaseLock:
    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._file: IO[str] | None = None

    def acquire(self) -> DatabaseLock:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DatabaseLocked(
                f"another controller (pid {holder}) is using the SQLite database {self.path.with_suffix('')}: "
                "one controller per SQLite file; stop it first, or run several controllers on PostgreSQL "
                "(controller init --database postgresql://...)"
            ) from None
        except OSError:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
