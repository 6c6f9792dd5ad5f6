"""`edgefleet-agent install --bundle` as root, for real, into a temporary root: users and groups by
useradd/groupadd, files with their owners and modes, the unit systemd-analyze accepts; again with
the same bundle changes nothing; a bad bundle is refused and changes nothing. The installed
config then runs a real agent against a real broker."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet_proto.bundle import pack

from tests.support.agent_peer import Peer, public_key
from tests.support.broker import REPO, Broker
from tests.support.certs import issue, make_ca
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="installs users and files: needs root and useradd",
)
AGENT = [sys.executable, "-m", "agent.cli"]


def device_root(folder: Path) -> Path:
    """A device's root as a fresh OS image has it: root in /etc/passwd and /etc/group, and the
    video group; no EdgeFleet user, no audio or dialout group yet."""
    root = folder / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).write_text("root:*::::::\n" if name == "shadow" else "root:*::\n")
        (root / "etc" / name).chmod(0o600)
    return root


def agent_toml(device_id: str, key: str, data_dir: str = "/var/lib/edgefleet-agent", port: int = 1883) -> str:
    return (
        f'device_id = "{device_id}"\n'
        f'data_dir = "{data_dir}"\n'
        'socket = "/run/edgefleet-agent/inference.sock"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nusername = "{device_id}"\npassword = "secret-{device_id}"\n'
        f'[api]\nsocket_group = "edgefleet-apps"\n'
        + (f'[security]\ncontroller_public_key = "{key}"\n' if key else "")
        + '[accelerator]\nruntime = "onnxruntime-tensorrt"\n'
    )


KEY = public_key(Ed25519PrivateKey.generate()).hex()


def write_bundle(path: Path, device_id: str, files: dict[str, bytes], secret: set[str] | None = None) -> Path:
    path.write_bytes(pack(device_id, files, secret if secret is not None else {"agent.toml"}))
    return path


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "install", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every path under ``root``: mode, owner, group and content (or link target)."""
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            content: bytes | str = os.readlink(path)
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = ""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, content)
    return found


def ids(root: Path, table: str, name: str) -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {table}")


def test_install_lays_out_the_service_and_again_changes_nothing(tmp_path: Path) -> None:
    root = device_root(tmp_path)
    bundle = write_bundle(
        tmp_path / "cam-1.bundle", "cam-1", {"agent.toml": agent_toml("cam-1", KEY).encode()}
    )

    done = install("--bundle", str(bundle), "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert "created user edgefleet" in done.stdout
    assert f"installed into {root}; not started" in done.stdout

    uid, gid = ids(root, "passwd", "edgefleet"), ids(root, "group", "edgefleet")
    group_lines = (root / "etc/group").read_text()
    for name in ("edgefleet-apps", "audio", "dialout"):
        assert f"\n{name}:" in group_lines
    assert "video:x:44:edgefleet" in group_lines  # the group the image had, joined

    config = root / "etc/edgefleet/agent.toml"
    assert config.read_text() == agent_toml("cam-1", KEY)
    assert (stat.S_IMODE(config.stat().st_mode), config.stat().st_uid, config.stat().st_gid) == (
        0o640,
        0,
        gid,
    )
    folder = (root / "etc/edgefleet").stat()
    assert (stat.S_IMODE(folder.st_mode), folder.st_gid) == (0o750, gid)
    data = (root / "var/lib/edgefleet-agent").stat()
    assert (stat.S_IMODE(data.st_mode), data.st_uid, data.st_gid) == (0o750, uid, gid)
    runtime = (root / "run/edgefleet-agent").stat()
    assert (stat.S_IMODE(runtime.st_mode), runtime.st_uid) == (0o751, uid)

    unit = root / "etc/systemd/system/edgefleet-agent.service"
    text = unit.read_text()
    assert (
        f"ExecStart={Path(sys.executable).parent / 'edgefleet-agent'} run --config /etc/edgefleet/agent.toml\n"
        in text
    )
    assert (
        "User=edgefleet\n" in text
        and "ReadWritePaths=/var/lib/edgefleet-agent /run/edgefleet-agent\n" in text
    )
    wants = root / "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/edgefleet-agent.service"
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert (verified.returncode, verified.stderr) == (0, ""), verified.stderr

    before = tree(root)
    again = install("--bundle", str(bundle), "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "device cam-1 is installed as the bundle says: nothing to change" in again.stdout
    assert tree(root) == before


def test_without_systemd_the_install_says_so_and_lays_everything_out(tmp_path: Path) -> None:
    """As in a container: the root is the running system's (here a temporary one standing in for
    it, so the host is left alone) and systemd does not run it."""
    from agent.install import install as install_here

    root = device_root(tmp_path)
    bundle = write_bundle(tmp_path / "b", "cam-2", {"agent.toml": agent_toml("cam-2", KEY).encode()})
    result = install_here(bundle, root, systemd_running=lambda: False, running_system=True)
    assert result.started is False
    assert result.lines[-1] == (
        "systemd is not running on this machine (/run/systemd/system does not exist): the agent is "
        "installed and edgefleet-agent.service enabled for the next boot, but not started; to run it now: "
        f"runuser -u edgefleet -- {Path(sys.executable).parent / 'edgefleet-agent'} run --config "
        "/etc/edgefleet/agent.toml"
    )
    assert (root / "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service").is_symlink()
    assert (root / "etc/edgefleet/agent.toml").is_file() and (root / "var/lib/edgefleet-agent").is_dir()


def refused(tmp_path: Path, root: Path, bundle: Path, *extra: str) -> str:
    before = tree(root)
    done = install("--bundle", str(bundle), "--root", str(root), *extra)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "nothing was changed" in done.stderr
    assert tree(root) == before
    return done.stderr


def test_a_corrupt_bundle_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    root = device_root(tmp_path)
    good = pack("cam-1", {"agent.toml": agent_toml("cam-1", KEY).encode()}, {"agent.toml"})
    (tmp_path / "cut").write_bytes(good[: len(good) - 40])
    assert "corrupt or truncated" in refused(tmp_path, root, tmp_path / "cut")
    (tmp_path / "empty").write_bytes(b"")
    assert "corrupt or truncated" in refused(tmp_path, root, tmp_path / "empty")


def test_a_bundle_for_another_device_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    root = device_root(tmp_path)
    mine = write_bundle(tmp_path / "mine", "cam-1", {"agent.toml": agent_toml("cam-1", KEY).encode()})
    assert install("--bundle", str(mine), "--root", str(root)).returncode == 0
    other = write_bundle(tmp_path / "other", "cam-9", {"agent.toml": agent_toml("cam-9", KEY).encode()})
    message = refused(tmp_path, root, other)
    assert "this device is provisioned as 'cam-1' and the bundle is for 'cam-9'" in message
    assert "it is for device 'cam-9', not 'cam-1' (--device-id)" in refused(
        tmp_path, device_root(tmp_path / "fresh"), other, "--device-id", "cam-1"
    )
    mismatched = write_bundle(tmp_path / "mixed", "cam-1", {"agent.toml": agent_toml("cam-9", KEY).encode()})
    assert "its manifest is for 'cam-1' but its agent.toml for 'cam-9'" in refused(tmp_path, root, mismatched)
    # Asked for in so many words, the device becomes cam-9.
    done = install("--bundle", str(other), "--root", str(root), "--replace")
    assert done.returncode == 0, done.stderr
    assert 'device_id = "cam-9"' in (root / "etc/edgefleet/agent.toml").read_text()


def test_a_bundle_missing_a_key_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    root = device_root(tmp_path)
    unpinned = write_bundle(tmp_path / "unpinned", "cam-1", {"agent.toml": agent_toml("cam-1", "").encode()})
    assert "controller_public_key" in refused(tmp_path, root, unpinned)

    ca = make_ca(tmp_path / "pki")
    cert = issue(ca, tmp_path / "pki", "cam-1", "cam-1")
    toml = agent_toml("cam-1", KEY).replace(
        "[api]",
        'tls_ca_file = "broker-ca.crt"\ntls_cert_file = "cam-1.crt"\ntls_key_file = "cam-1.key"\n[api]',
    )
    files = {
        "agent.toml": toml.encode(),
        "broker-ca.crt": ca.cert_file.read_bytes(),
        "cam-1.crt": cert.cert_file.read_bytes(),
    }
    no_key = write_bundle(tmp_path / "no-key", "cam-1", files)
    assert "mqtt.tls_key_file: no such file" in refused(tmp_path, root, no_key)

    stranger = issue(ca, tmp_path / "pki", "other", "cam-1")
    wrong_key = write_bundle(
        tmp_path / "wrong-key", "cam-1", {**files, "cam-1.key": stranger.key_file.read_bytes()}
    )
    assert "its private key does not belong to its certificate" in refused(tmp_path, root, wrong_key)

    someone = issue(ca, tmp_path / "pki", "cam-7", "cam-7")
    theirs = {
        **files,
        "cam-1.crt": someone.cert_file.read_bytes(),
        "cam-1.key": someone.key_file.read_bytes(),
    }
    assert "its certificate is for ['cam-7'], not for device 'cam-1'" in refused(
        tmp_path, root, write_bundle(tmp_path / "theirs", "cam-1", theirs)
    )

    whole = write_bundle(
        tmp_path / "whole",
        "cam-1",
        {**files, "cam-1.key": cert.key_file.read_bytes()},
        {"agent.toml", "cam-1.key"},
    )
    done = install("--bundle", str(whole), "--root", str(root))
    assert done.returncode == 0, done.stderr
    key = (root / "etc/edgefleet/cam-1.key").stat()
    assert stat.S_IMODE(key.st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/edgefleet/cam-1.crt").stat().st_mode) == 0o644


def test_the_installed_config_runs_the_agent_against_the_broker(
    broker: Broker, make_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    broker.add_user(device_id, f"secret-{device_id}")
    root = device_root(tmp_path)
    # The agent runs on this machine, not inside the root: its data folder is a path here.
    data_dir = tmp_path / "data"
    toml = agent_toml(device_id, KEY, str(data_dir), broker.port)
    toml = toml.replace('socket = "/run/edgefleet-agent/inference.sock"\n', "").replace(
        '[api]\nsocket_group = "edgefleet-apps"\n', ""
    )
    bundle = write_bundle(tmp_path / "b", device_id, {"agent.toml": toml.encode()})
    assert install("--bundle", str(bundle), "--root", str(root)).returncode == 0
    peer = make_peer(device_id)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(root / "etc/edgefleet/agent.toml")],
            cwd=REPO,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(lambda: any(s.online for s in peer.statuses), 30, "the installed agent online")
        reported = wait_until(lambda: peer.last_reported(), 30, "a reported state")
        assert [c.kind for c in reported.conditions] == ["accelerator_unavailable"]
    finally:
        proc.terminate()
        proc.wait(20)
