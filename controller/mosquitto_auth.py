"""Mosquitto's password file, kept in step with the controller's database.

Hashes use mosquitto_passwd's own format, ``$7$<iterations>$<b64 salt>$<b64
PBKDF2-HMAC-SHA512>``, so the broker checks device passwords itself and the
controller never stores one in the clear. After every rewrite the configured
reload command makes the broker read the file again. It runs through ``/bin/sh``,
so ``kill -HUP $(cat /var/lib/edgefleet/mosquitto/mosquitto.pid)`` works as well as
``systemctl reload mosquitto``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import subprocess
from collections.abc import Iterable
from pathlib import Path

from controller.errors import BrokerAuthError
from controller.files import atomic_write

log = logging.getLogger(__name__)

ITERATIONS = 101  # what mosquitto_passwd writes
SALT_BYTES = 12
RELOAD_TIMEOUT_S = 30.0


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(derived, expected)


def render(entries: Iterable[tuple[str, str]]) -> str:
    """One ``username:hash`` line per entry, in the order given."""
    lines = []
    for username, encoded in entries:
        if ":" in username or "\n" in username or "\n" in encoded:
            raise BrokerAuthError(f"cannot write user {username!r} to a mosquitto password file")
        lines.append(f"{username}:{encoded}")
    return "\n".join(lines) + "\n"


class BrokerAuth:
    """Writes the password file atomically and asks the broker to reload it."""

    def __init__(self, passwd_file: Path, reload_command: str) -> None:
        self.passwd_file = passwd_file
        self.reload_command = reload_command

    def sync(self, entries: Iterable[tuple[str, str]]) -> None:
        self.write(entries)
        self.reload()

    def write(self, entries: Iterable[tuple[str, str]]) -> None:
        """Rewrite the password file without asking the broker to reload it."""
        data = render(entries).encode()
        mode = 0o600
        gid = -1
        try:
            current = self.passwd_file.stat()
            # Keep whatever mode and group the operator gave the file for mosquitto.
            mode, gid = current.st_mode & 0o777, current.st_gid
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BrokerAuthError(f"cannot write {self.passwd_file}: {exc}") from None
        try:
            atomic_write(self.passwd_file, data, mode=mode)
            if gid != -1 and gid != os.getegid():
                os.chown(self.passwd_file, -1, gid)
        except OSError as exc:
            raise BrokerAuthError(f"cannot write {self.passwd_file}: {exc}") from None
        log.info("password file written path=%s users=%d", self.passwd_file, data.count(b"\n"))

    def reload(self) -> None:
        if not self.reload_command.strip():
            log.warning("no broker reload command configured; mosquitto must be reloaded by hand")
            return
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", self.reload_command],
                capture_output=True,
                text=True,
                timeout=RELOAD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerAuthError(f"broker reload command {self.reload_command!r} failed: {exc}") from None
        if done.returncode != 0:
            raise BrokerAuthError(
                f"broker reload command {self.reload_command!r} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
            )
        log.info("broker reloaded command=%r", self.reload_command)
