"""What the agent uses from Python 3.11 that the Python devices ship may lack.

Ubuntu 22.04 and JetPack 6 ship Python 3.10, so the agent runs there: on 3.10 the
same names come from ``tomli`` (pulled in by the ``agent`` extra only for that Python)
and from here. Agent modules import these names from here, never from ``tomllib`` or
``enum`` directly.
"""

from __future__ import annotations

import sqlite3
import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib
else:
    from enum import Enum

    import tomli as tomllib

    class StrEnum(str, Enum):
        """enum.StrEnum as the agent uses it: members are their values, in str() too."""

        def __str__(self) -> str:
            return str.__str__(self)


__all__ = ["StrEnum", "sqlite_full", "tomllib"]

# SQLite's result code for "database or disk is full"; sqlite3 names it from Python 3.11.
_SQLITE_FULL = 13


def sqlite_full(exc: sqlite3.Error) -> bool:
    """``exc`` is SQLite's SQLITE_FULL. Python 3.10's sqlite3 errors carry no result code
    (``sqlite_errorcode`` came in 3.11), only SQLite's fixed message for it."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code == _SQLITE_FULL)
    return str(exc) == "database or disk is full"
