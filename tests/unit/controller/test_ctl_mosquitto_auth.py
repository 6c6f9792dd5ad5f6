from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.errors import BrokerAuthError
from controller.mosquitto_auth import BrokerAuth, hash_password, render, verify_password


def test_hash_has_mosquitto_passwd_format() -> None:
    encoded = hash_password("s3cret")
    empty, seven, iterations, salt, digest = encoded.split("$")
    assert (empty, seven, iterations) == ("", "7", "101")
    assert len(base64.b64decode(salt)) == 12
    assert len(base64.b64decode(digest)) == 64
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert hash_password("s3cret") != encoded, "a fresh salt every time"


def test_hash_rederives_a_line_written_by_the_real_mosquitto_passwd(tmp_path: Path) -> None:
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run([binary, "-b", str(passwd), "dev-1", "pa:ss word"], check=True)
    username, encoded = passwd.read_text().strip().split(":", 1)
    assert username == "dev-1"
    salt = base64.b64decode(encoded.split("$")[3])
    assert hash_password("pa:ss word", salt=salt) == encoded
    assert verify_password("pa:ss word", encoded)
    assert not verify_password("pa:ss words", encoded)
    # And the reverse: pbkdf2 of our own line matches what mosquitto would compute.
    ours = hash_password("x", salt=b"\x01" * 12)
    expected = base64.b64encode(hashlib.pbkdf2_hmac("sha512", b"x", b"\x01" * 12, 101)).decode()
    assert ours.endswith("$" + expected)


def test_verify_rejects_garbage() -> None:
    for bad in ("", "plain", "$6$abc$def", "$7$x$AAAA$BBBB", "$7$101$!!!$AAAA"):
        assert not verify_password("p", bad)


def test_render_refuses_a_username_that_would_break_the_file() -> None:
    assert render([("a", "$7$h")]) == "a:$7$h\n"
    with pytest.raises(BrokerAuthError):
        render([("a:b", "$7$h")])


def test_sync_writes_the_file_and_runs_the_reload_command(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    auth = BrokerAuth(tmp_path / "mosq" / "passwd", f"touch {marker}")
    auth.sync([("edgefleet-controller", "$7$a"), ("dev-1", "$7$b")])
    assert (tmp_path / "mosq" / "passwd").read_text() == "edgefleet-controller:$7$a\ndev-1:$7$b\n"
    assert (tmp_path / "mosq" / "passwd").stat().st_mode & 0o777 == 0o600
    assert marker.exists()
    assert not [p for p in (tmp_path / "mosq").iterdir() if p.name != "passwd"], "no temp file left behind"


def test_sync_keeps_the_mode_the_operator_chose(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("old\n")
    passwd.chmod(0o640)
    BrokerAuth(passwd, "").sync([("u", "$7$h")])
    assert passwd.stat().st_mode & 0o777 == 0o640
    assert passwd.read_text() == "u:$7$h\n"


def test_failing_reload_command_is_an_error_naming_it(tmp_path: Path) -> None:
    auth = BrokerAuth(tmp_path / "passwd", "sh -c 'echo no such broker >&2; exit 3'")
    with pytest.raises(BrokerAuthError, match="exited 3: no such broker"):
        auth.sync([("u", "$7$h")])
    with pytest.raises(BrokerAuthError, match=r"exited 127: .*/nonexistent/reload"):
        BrokerAuth(tmp_path / "passwd", "/nonexistent/reload").sync([("u", "$7$h")])


def test_reload_command_runs_through_a_shell(tmp_path: Path) -> None:
    pid_file = tmp_path / "broker.pid"
    pid_file.write_text("12345\n")
    marker = tmp_path / "signalled"
    BrokerAuth(tmp_path / "passwd", f"echo HUP $(cat {pid_file}) > {marker}").sync([("u", "$7$h")])
    assert marker.read_text() == "HUP 12345\n"
