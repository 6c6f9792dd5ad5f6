"""A real Mosquitto for tests and the demo, configured from deploy/mosquitto/."""

from __future__ import annotations

import getpass
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "mosquitto"
CONTROLLER_USER = "edgefleet-controller"


def _ephemeral_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_EPHEMERAL = _ephemeral_range()
# Listening ports come from below the kernel's ephemeral range: a port the kernel handed out
# (port 0) is also what it hands every outgoing connection, so on a busy machine a client's
# connection could take it between this pick and the server's bind ("address already in use").
_LISTEN_PORTS = range(10000, min(_EPHEMERAL.start, 32768))
_random = random.Random()


def free_port() -> int:
    for _ in range(200):
        port = _random.choice(_LISTEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def render_config(port: int, passwd: Path, acl: Path, persistence: Path, log: Path) -> str:
    """The deploy config with the listener and every path moved into ``workdir``."""
    replaced = {
        "listener": f"listener {port} 127.0.0.1",
        "password_file": f"password_file {passwd}",
        "acl_file": f"acl_file {acl}",
        "persistence_location": f"persistence_location {persistence}/",
    }
    lines = []
    for line in (DEPLOY / "edgefleet.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replaced.get(key, line))
    # Run as whoever runs the tests: as root, mosquitto would otherwise switch to
    # the mosquitto user, which cannot read the test's temporary folder.
    lines.append(f"user {getpass.getuser()}")
    lines.append(f"log_dest file {log}")
    lines.append("log_type error\nlog_type warning\nlog_type notice\nlog_type information")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TlsListener:
    """deploy/mosquitto/edgefleet-tls.conf's listener, with the test's certificates."""

    cert_file: Path
    key_file: Path
    # The CA that client certificates must come from.
    ca_file: Path
    require_certificate: bool = False
    port: int = field(default_factory=free_port)
    # The controller's revocation list (DATA/ca/crl.pem); without one the crlfile line is left out.
    crl_file: Path | None = None


def render_tls_config(tls: TlsListener) -> str:
    certificate_login = "true" if tls.require_certificate else "false"
    replaced = {
        "listener": f"listener {tls.port} 127.0.0.1",
        "certfile": f"certfile {tls.cert_file}",
        "keyfile": f"keyfile {tls.key_file}",
        "cafile": f"cafile {tls.ca_file}",
        "require_certificate": f"require_certificate {certificate_login}",
        "use_identity_as_username": f"use_identity_as_username {certificate_login}",
    }
    lines = (DEPLOY / "edgefleet-tls.conf").read_text().splitlines()
    if tls.crl_file is not None:
        replaced["crlfile"] = f"crlfile {tls.crl_file}"
    else:
        lines = [line for line in lines if not line.startswith("crlfile ")]
    return "\n".join(replaced.get(line.split(" ", 1)[0], line) for line in lines) + "\n"


@dataclass
class Broker:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    tls: TlsListener | None = None
    tool_users: list[str] = field(default_factory=list)

    @property
    def passwd_file(self) -> Path:
        return self.workdir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.workdir / "edgefleet.acl"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def reload_command(self) -> str:
        """What the controller runs after rewriting the password file."""
        assert self.proc is not None
        return f"kill -HUP {self.proc.pid}"

    def start(self) -> Broker:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        if not self.passwd_file.exists():
            self.passwd_file.touch(mode=0o600)
        self._write_acl()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            render_config(self.port, self.passwd_file, self.acl_file, self.workdir / "data", self.log_file)
            + (render_tls_config(self.tls) if self.tls else "")
        )
        # Startup errors (bad config, busy port) go to stderr before the log file opens.
        with (self.workdir / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self._diagnostics()}") from None
        return self

    def _diagnostics(self) -> str:
        parts = [p.read_text() for p in (self.workdir / "stderr.log", self.log_file) if p.exists()]
        return "\n".join(parts)[-2000:]

    def _write_acl(self) -> None:
        """The deploy ACL, plus the test tools' accounts (add_tool_user)."""
        tools = "".join(f"\nuser {name}\ntopic readwrite edgefleet/#\n" for name in self.tool_users)
        self.acl_file.write_text((DEPLOY / "edgefleet.acl").read_text() + tools)

    def add_tool_user(self, username: str) -> str:
        """A broker account with the controller's rights on the whole tree; returns its password.

        For test tools (observers, forgers, load generators) that connect beside a
        running controller: the broker binds client ids to usernames, so a second
        login as edgefleet-controller would take the controller's own session over.
        """
        return self.add_tool_users([username])[0]

    def add_tool_users(self, usernames: list[str]) -> list[str]:
        """Several tool accounts at once (one per concurrent connection), with one reload."""
        passwords = [uuid.uuid4().hex for _ in usernames]
        self.tool_users.extend(usernames)
        self._write_acl()
        for username, password in zip(usernames, passwords, strict=True):
            subprocess.run(["mosquitto_passwd", "-b", str(self.passwd_file), username, password], check=True)
        self.reload()
        return passwords

    def add_user(self, username: str, password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", str(self.passwd_file), username, password], check=True)
        self.reload()

    def reload(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            # Mosquitto reloads between network loop iterations; give it one.
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
