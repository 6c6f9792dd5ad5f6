"""``edgefleet-agent install --bundle FILE``: a device joins the fleet from its provisioning bundle.

What it lays out under ``--root`` (``/`` on a device; another folder to prepare an image):

- the service user and groups the unit names (``User=``, ``Group=``,
  ``SupplementaryGroups=`` of deploy/systemd/edgefleet-agent.service), made with
  groupadd/useradd when missing;
- ``/etc/edgefleet/``: agent.toml and the TLS files of the bundle, root's, readable by the
  agent's group only (agent.toml and the private key 0640, the folder 0750);
- the agent's data folder (agent.toml's ``data_dir``) and its socket's folder, the agent's;
- ``/etc/systemd/system/edgefleet-agent.service``: the unit of deploy/systemd with
  ``ExecStart=`` naming this installation's ``edgefleet-agent``, enabled (the
  ``multi-user.target.wants`` link that ``systemctl enable`` makes);
- then, when systemd runs this machine (``/run/systemd/system`` exists) and the root is
  ``/``: ``systemctl daemon-reload`` and a start, or a restart when anything changed.
  Without systemd (a container, a chroot) it says so and how to start the agent by hand;
  everything else is in place.

Everything is checked before anything changes: the bundle is intact (manifest and
digests), its agent.toml passes the agent's own config checks with its TLS files beside
it, it is for this device and pins the controller's key, a certificate comes with its
own key and names the device. A refused bundle changes nothing. The work is a plan of
steps from what is found to what the bundle asks, so a second run with the same bundle
plans nothing and restarts nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from edgefleet_proto.bundle import AGENT_CONFIG, BundleError, unpack

from agent.atomic import write_atomic
from agent.compat import tomllib
from agent.config import AgentConfig, parse_config
from agent.errors import BundleRefused, ConfigError, InstallError

UNIT_NAME = "edgefleet-agent.service"
CONFIG_DIR = PurePosixPath("/etc/edgefleet")
UNIT_DIR = PurePosixPath("/etc/systemd/system")
# What `systemctl enable` links for the unit's WantedBy=multi-user.target.
WANTS_DIR = UNIT_DIR / "multi-user.target.wants"
# sd_booted(3): systemd runs this machine when this folder exists.
SYSTEMD_RUNNING = Path("/run/systemd/system")
# Folders the unit hides from the service (ProtectHome=true, PrivateTmp=true): an agent
# installed there cannot start.
HIDDEN_FROM_SERVICE = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


# -- the unit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    text: str
    user: str
    group: str
    supplementary: tuple[str, ...]
    runtime_dir: PurePosixPath


def unit_template() -> str:
    """deploy/systemd/edgefleet-agent.service, as the package carries it (agent/units/)."""
    return (resources.files("agent") / "units" / UNIT_NAME).read_text(encoding="utf-8")


def parse_unit(text: str) -> Unit:
    keys: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            keys.setdefault(key.strip(), value.strip())
    return Unit(
        text=text,
        user=keys["User"],
        group=keys["Group"],
        supplementary=tuple(keys.get("SupplementaryGroups", "").split()),
        runtime_dir=PurePosixPath("/run") / keys["RuntimeDirectory"],
    )


def unit_for(unit: Unit, command: str, config_file: PurePosixPath, writable: Iterable[PurePosixPath]) -> str:
    """The unit with this installation's agent command and the folders agent.toml names."""
    lines = []
    for line in unit.text.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={command} run --config {config_file}"
        elif line.startswith("ReadWritePaths="):
            line = "ReadWritePaths=" + " ".join(str(p) for p in writable)
        lines.append(line)
    return "\n".join(lines) + "\n"


def agent_command() -> str:
    """This installation's ``edgefleet-agent``: the console script beside this Python, else the module."""
    script = Path(sys.executable).parent / "edgefleet-agent"
    if os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m agent.cli"


# -- what is there -----------------------------------------------------------------------


def _table(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group: name -> fields."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    return {f[0]: f for f in (line.split(":") for line in lines) if len(f) >= 3}


@dataclass(frozen=True)
class Accounts:
    users: Mapping[str, list[str]]
    groups: Mapping[str, list[str]]

    @classmethod
    def read(cls, root: Path) -> Accounts:
        return cls(_table(root / "etc/passwd"), _table(root / "etc/group"))

    def uid(self, name: str) -> int:
        return int(self.users[name][2])

    def gid(self, name: str) -> int:
        return int(self.groups[name][2])

    def members(self, group: str) -> set[str]:
        fields = self.groups.get(group)
        return set(filter(None, fields[3].split(","))) if fields and len(fields) > 3 else set()


@dataclass(frozen=True)
class Found:
    """A path as it is: kind ('file', 'dir', 'link' or '' when absent) and what identifies it."""

    kind: str
    digest: str = ""
    mode: int = 0
    uid: int = -1
    gid: int = -1
    target: str = ""


def survey(path: Path) -> Found:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Found("")
    if path.is_symlink():
        return Found("link", target=os.readlink(path))
    if path.is_dir():
        return Found("dir", mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Found("file", digest, st.st_mode & 0o7777, st.st_uid, st.st_gid)


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    # group, user, join, dir, file, link
    action: str
    target: str
    data: bytes = field(default=b"", repr=False)
    mode: int = 0
    owner: str = ""
    group: str = ""
    extra: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.action == "group":
            return f"created group {self.target}"
        if self.action == "user":
            return f"created user {self.target} (groups {', '.join(self.extra)})"
        if self.action == "join":
            return f"added user {self.target} to {', '.join(self.extra)}"
        if self.action == "link":
            return f"enabled {UNIT_NAME} ({self.target} -> {self.extra[0]})"
        made = "made folder" if self.action == "dir" else "wrote"
        return f"{made} {self.target} ({self.owner}:{self.group} {self.mode:04o})"


@dataclass(frozen=True)
class Wanted:
    """What the bundle asks the device to hold."""

    groups: tuple[str, ...]
    user: str
    user_group: str
    user_groups: tuple[str, ...]
    dirs: tuple[tuple[PurePosixPath, int, str, str], ...]
    files: tuple[tuple[PurePosixPath, bytes, int, str, str], ...]
    link: tuple[PurePosixPath, PurePosixPath]


def plan(wanted: Wanted, accounts: Accounts, found: Callable[[PurePosixPath], Found]) -> list[Step]:
    """The steps from what is found to what is wanted; none when they are the same."""
    steps = [Step("group", g) for g in wanted.groups if g not in accounts.groups]
    known = set(accounts.groups) | set(wanted.groups)
    if wanted.user not in accounts.users:
        steps.append(Step("user", wanted.user, group=wanted.user_group, extra=wanted.user_groups))
    else:
        missing = tuple(
            g for g in wanted.user_groups if g in known and wanted.user not in accounts.members(g)
        )
        if missing:
            steps.append(Step("join", wanted.user, extra=missing))

    def owned(path: PurePosixPath, kind: str, mode: int, owner: str, group: str, digest: str = "") -> bool:
        have = found(path)
        if have.kind != kind or have.mode != mode or (digest and have.digest != digest):
            return False
        if owner not in accounts.users or group not in accounts.groups:
            return False
        return (have.uid, have.gid) == (accounts.uid(owner), accounts.gid(group))

    for path, mode, owner, group in wanted.dirs:
        if not owned(path, "dir", mode, owner, group):
            steps.append(Step("dir", str(path), mode=mode, owner=owner, group=group))
    for path, data, mode, owner, group in wanted.files:
        if not owned(path, "file", mode, owner, group, hashlib.sha256(data).hexdigest()):
            steps.append(Step("file", str(path), data, mode, owner, group))
    link, target = wanted.link
    if found(link) != Found("link", target=str(target)):
        steps.append(Step("link", str(link), extra=(str(target),)))
    return steps


# -- checking the bundle -----------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    device_id: str
    config: AgentConfig
    files: Mapping[str, bytes]
    secret: frozenset[str]
    data_dir: PurePosixPath
    socket: PurePosixPath


def _device_of_installed(path: Path) -> str:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, tomllib.TOMLDecodeError):
        return ""
    device = doc.get("device_id", "")
    return device if isinstance(device, str) else ""


def check_bundle(
    data: bytes,
    root: Path,
    unit: Unit,
    expect_device: str | None = None,
    replace: bool = False,
) -> Checked:
    """The bundle, checked for this device; BundleRefused says what is wrong with it."""
    try:
        bundle = unpack(data)
    except BundleError as exc:
        raise BundleRefused(str(exc)) from None
    raw = bundle.files[AGENT_CONFIG].decode("utf-8", errors="replace")
    existing = set(Accounts.read(root).groups) | {unit.group, *unit.supplementary}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bundle-") as tmp:
        folder = Path(tmp)
        for name, content in bundle.files.items():
            (folder / name).write_bytes(content)
        try:
            config = parse_config(raw, folder / AGENT_CONFIG, group_exists=existing.__contains__)
        except ConfigError as exc:
            raise BundleRefused(
                f"its agent.toml is refused: {str(exc).replace(str(folder) + '/', '')}"
            ) from None
        _check_certificate(config, folder)
    doc = tomllib.loads(raw)
    device = config.device_id
    if bundle.device_id != device:
        raise BundleRefused(f"its manifest is for {bundle.device_id!r} but its agent.toml for {device!r}")
    if expect_device is not None and expect_device != device:
        raise BundleRefused(f"it is for device {device!r}, not {expect_device!r} (--device-id)")
    installed = _device_of_installed(root / _rel(CONFIG_DIR / AGENT_CONFIG))
    if installed and installed != device and not replace:
        raise BundleRefused(
            f"this device is provisioned as {installed!r} and the bundle is for {device!r}: "
            "pass --replace to make it that device"
        )
    if not config.security.controller_public_key:
        raise BundleRefused(
            "it pins no controller public key ([security] controller_public_key): the agent would "
            "run unsigned models; make a new bundle with `edgefleet devices register ID --bundle FILE`"
        )
    for key in ("data_dir", "socket"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith("/")):
            raise BundleRefused(f"its agent.toml's {key} {value!r} is not an absolute path on the device")
    socket = (
        PurePosixPath(doc["socket"]) if "socket" in doc else PurePosixPath(doc["data_dir"]) / "inference.sock"
    )
    return Checked(device, config, bundle.files, bundle.secret, PurePosixPath(doc["data_dir"]), socket)


def _check_certificate(config: AgentConfig, folder: Path) -> None:
    """A client certificate must name the device (the broker logs it in by that name) and come
    with its own private key."""
    if not config.mqtt.tls_cert_file:
        return
    try:
        cert = x509.load_pem_x509_certificate(Path(config.mqtt.tls_cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(config.mqtt.tls_key_file).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleRefused(f"its certificate or key cannot be read: {exc}") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [config.device_id]:
        raise BundleRefused(f"its certificate is for {names}, not for device {config.device_id!r}")
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*der) != cert.public_key().public_bytes(*der):
        raise BundleRefused("its private key does not belong to its certificate")


# -- doing it ----------------------------------------------------------------------------


def _rel(path: PurePosixPath) -> str:
    return str(path).lstrip("/")


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise InstallError(f"{command[0]} cannot run: {exc}") from None
    if done.returncode != 0:
        raise InstallError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()}")


class Executor:
    def __init__(self, root: Path) -> None:
        self.root = root
        # useradd/groupadd edit the root's own /etc files, without chrooting into it.
        self.prefix = [] if root == Path("/") else ["--prefix", str(root)]

    def path(self, target: str) -> Path:
        return self.root / target.lstrip("/")

    def ids(self, owner: str, group: str) -> tuple[int, int]:
        accounts = Accounts.read(self.root)
        return accounts.uid(owner), accounts.gid(group)

    def group(self, step: Step) -> None:
        _run(["groupadd", "--system", *self.prefix, step.target])

    def user(self, step: Step) -> None:
        groups = ["--groups", ",".join(step.extra)] if step.extra else []
        account = ["--home-dir", "/nonexistent", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        command = ["useradd", "--system", *self.prefix, "--gid", step.group, *groups, *account]
        _run([*command, "--comment", "EdgeFleet agent", step.target])

    def join(self, step: Step) -> None:
        _run(["usermod", *self.prefix, "--append", "--groups", ",".join(step.extra), step.target])

    def dir(self, step: Step) -> None:
        path = self.path(step.target)
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *self.ids(step.owner, step.group))
        path.chmod(step.mode)

    def file(self, step: Step) -> None:
        path = self.path(step.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, step.data, mode=0o600)
        os.chown(path, *self.ids(step.owner, step.group))
        path.chmod(step.mode)

    def link(self, step: Step) -> None:
        path = self.path(step.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(step.extra[0])

    def run(self, step: Step) -> None:
        {
            "group": self.group,
            "user": self.user,
            "join": self.join,
            "dir": self.dir,
            "file": self.file,
            "link": self.link,
        }[step.action](step)


@dataclass(frozen=True)
class Result:
    device_id: str
    steps: tuple[Step, ...]
    lines: tuple[str, ...]
    started: bool


def wanted_for(checked: Checked, unit: Unit, command: str) -> Wanted:
    config_file = CONFIG_DIR / AGENT_CONFIG
    secret = {AGENT_CONFIG, *checked.secret}
    user, group = unit.user, unit.group
    files = [
        (CONFIG_DIR / name, data, 0o640 if name in secret else 0o644, "root", group)
        for name, data in sorted(checked.files.items())
    ]
    writable = [checked.data_dir, unit.runtime_dir]
    socket_dir = checked.socket.parent
    if not any(socket_dir == w or w in socket_dir.parents for w in writable):
        writable.append(socket_dir)
    files.append(
        (UNIT_DIR / UNIT_NAME, unit_for(unit, command, config_file, writable).encode(), 0o644, "root", "root")
    )
    dirs = [(CONFIG_DIR, 0o750, "root", group), (checked.data_dir, 0o750, user, group)]
    # The socket's folder: systemd makes the runtime folder at each start (RuntimeDirectory=),
    # but an agent started by hand needs it too.
    if socket_dir != checked.data_dir:
        dirs.append((socket_dir, 0o751 if socket_dir == unit.runtime_dir else 0o750, user, group))
    return Wanted(
        groups=tuple(dict.fromkeys((group, *unit.supplementary))),
        user=user,
        user_group=group,
        user_groups=unit.supplementary,
        dirs=tuple(dirs),
        files=tuple(files),
        link=(WANTS_DIR / UNIT_NAME, UNIT_DIR / UNIT_NAME),
    )


def install(
    bundle_file: Path,
    root: Path = Path("/"),
    *,
    expect_device: str | None = None,
    replace: bool = False,
    start: bool = True,
    command: str | None = None,
    systemd_running: Callable[[], bool] = SYSTEMD_RUNNING.is_dir,
    running_system: bool | None = None,
) -> Result:
    """``running_system``: the root is the system this runs on (the default for ``/``), so the
    service may be started there."""
    if os.geteuid() != 0:
        raise InstallError("install creates a user and writes under /etc: run it as root (sudo)")
    root = root.resolve()
    if running_system is None:
        running_system = root == Path("/")
    try:
        data = bundle_file.read_bytes()
    except OSError as exc:
        raise BundleRefused(f"cannot read {bundle_file}: {exc.strerror or exc}") from None
    unit = parse_unit(unit_template())
    checked = check_bundle(data, root, unit, expect_device, replace)
    command = command or agent_command()
    lines: list[str] = []
    hidden = next((h for h in HIDDEN_FROM_SERVICE if command.startswith(h)), None)
    if hidden:
        lines.append(
            f"warning: the agent is installed under {hidden}, which the unit hides from the service "
            "(ProtectHome=, PrivateTmp=): install it into /opt/edgefleet (python3 -m venv /opt/edgefleet; "
            "/opt/edgefleet/bin/pip install 'edgefleet[agent]'), then run install again from there"
        )
    wanted = wanted_for(checked, unit, command)
    steps = plan(wanted, Accounts.read(root), lambda p: survey(root / _rel(p)))
    executor = Executor(root)
    for step in steps:
        executor.run(step)
        lines.append(step.describe())
    if not steps:
        lines.append(f"device {checked.device_id} is installed as the bundle says: nothing to change")
    started = False
    service = UNIT_NAME.removesuffix(".service")
    if not running_system:
        lines.append(f"installed into {root}; not started (another root than this machine's)")
    elif not systemd_running():
        lines.append(
            f"systemd is not running on this machine ({SYSTEMD_RUNNING} does not exist): the agent is "
            f"installed and {UNIT_NAME} enabled for the next boot, but not started; to run it now: "
            f"runuser -u {unit.user} -- {command} run --config {CONFIG_DIR / AGENT_CONFIG}"
        )
    elif not start:
        lines.append(f"not started (--no-start): systemctl start {service}")
    else:
        changed = any(s.action in ("file", "link") for s in steps)
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "restart" if changed else "start", service])
        started = True
        lines.append(f"{'restarted' if changed else 'started'} {service} (systemctl status {service})")
    return Result(checked.device_id, tuple(steps), tuple(lines), started)
