"""A ready-to-run Mosquitto for a controller's data folder: its configuration, the ACL and
the command that starts it, written by ``edgefleet controller init``.

The directives are deploy/mosquitto/edgefleet.conf's and the ACL is
deploy/mosquitto/edgefleet.acl's (a unit test keeps them equal); only the listener
and the paths move into ``DATA/mosquitto/``. The broker runs as a daemon that writes
its pid file, so the controller's reload command is ``kill -HUP $(cat PIDFILE)`` (when
the file exists: a broker not started yet reads the password file when it starts).
"""

from __future__ import annotations

import getpass
import ipaddress
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from controller.roles import instance_accounts

# deploy/mosquitto/edgefleet.conf without its comments, the listener and the paths.
DIRECTIVES = """\
per_listener_settings false
allow_anonymous false
use_username_as_clientid true
persistence true
autosave_interval 30
max_queued_messages 100000
max_queued_bytes 268435456
max_inflight_messages 100
max_packet_size 2097152
set_tcp_nodelay true
"""

# deploy/mosquitto/edgefleet.acl, verbatim.
ACL = (
    """\
# EdgeFleet ACL for Mosquitto. Static: per-device rules are patterns, so
# registering a device only touches the password file.

# The controller owns the whole tree.
user edgefleet-controller
topic readwrite edgefleet/#

# So do its other processes (`edgefleet controller serve --instance N`, see
# docs/scaling.md): the broker binds a client id to its username, so each
# process connected at once logs in with an account of its own.
"""
    + "".join(f"user {name}\ntopic readwrite edgefleet/#\n" for name in instance_accounts())
    + """

# A device (MQTT username = device id) may only touch its own subtree, and only
# in the direction the contract uses.
pattern read edgefleet/v1/devices/%u/desired
pattern write edgefleet/v1/devices/%u/desired/request
pattern readwrite edgefleet/v1/devices/%u/reported
pattern readwrite edgefleet/v1/devices/%u/status
pattern write edgefleet/v1/devices/%u/telemetry
# The controller's acknowledgement of stored telemetry windows.
pattern read edgefleet/v1/devices/%u/telemetry/ack
pattern write edgefleet/v1/devices/%u/events
pattern write edgefleet/v1/devices/%u/artifact/request
pattern read edgefleet/v1/devices/%u/artifact/response
# Tenant pipeline results, one topic per tenant (results/{tenant}).
pattern write edgefleet/v1/devices/%u/results/#
pattern write edgefleet/v1/devices/%u/capture

# Wave broadcasts (edgefleet/v1/waves/{wave}/{digest}): every device may read them, each
# artifact being sealed with a key that only the devices assigned it get; none may write.
pattern read edgefleet/v1/waves/+/+
"""
)


@dataclass(frozen=True)
class BrokerFiles:
    """Where a data folder's broker keeps its files."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.folder / "edgefleet.acl"

    @property
    def passwd(self) -> Path:
        return self.folder / "passwd"

    @property
    def pid_file(self) -> Path:
        return self.folder / "mosquitto.pid"

    @property
    def log(self) -> Path:
        return self.folder / "mosquitto.log"

    @property
    def persistence(self) -> Path:
        return self.folder / "data"

    def reload_command(self) -> str:
        """Run through a shell by the controller after each password file rewrite. Without a
        pid file the broker is not running: nothing to reload, it reads the file when it starts."""
        pid_file = shlex.quote(str(self.pid_file))
        return f'test ! -e {pid_file} || kill -HUP "$(cat {pid_file})"'

    def start_command(self) -> str:
        binary = mosquitto_binary() or "mosquitto"
        return f"{shlex.quote(binary)} -c {shlex.quote(str(self.conf))} -d"

    def render_conf(self, port: int, host: str, passwd_file: Path) -> str:
        """The configuration; a loopback ``host`` keeps the listener on loopback too."""
        listener = f"listener {port} {host}" if _is_loopback(host) else f"listener {port}"
        lines = [
            "# Written by `edgefleet controller init`; start it with:",
            f"#   {self.start_command()}",
            listener,
            DIRECTIVES.rstrip("\n"),
            f"password_file {passwd_file}",
            f"acl_file {self.acl}",
            f"persistence_location {self.persistence}/",
            f"pid_file {self.pid_file}",
            f"log_dest file {self.log}",
            # Whoever ran init owns these files; as root, mosquitto would otherwise switch
            # to the mosquitto user, which may not read them.
            f"user {getpass.getuser()}",
        ]
        return "\n".join(lines) + "\n"


def mosquitto_binary() -> str | None:
    """Where Mosquitto is installed: on PATH, or in /usr/sbin (Debian's, off a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
