"""The provisioning bundle: what a device needs to join the fleet, in one file.

``edgefleet devices register ID --bundle FILE`` writes it on the operator's machine;
``edgefleet-agent install --bundle FILE`` reads it on the device. It is a gzip'd tar
of flat files, ``manifest.json`` first::

    manifest.json   {"format": "edgefleet-provisioning-bundle", "version": 1,
                     "device_id": "cam-1",
                     "files": {"agent.toml": {"sha256": "...", "size": 812, "secret": true}, ...}}
    agent.toml      broker address and credentials, the pinned controller key, profile settings
    broker-ca.crt   the CA of the broker's certificate (TLS brokers)
    cam-1.crt       the device's client certificate and its key (``--issue-cert``)
    cam-1.key

``secret`` files (the MQTT password, the private key) are installed readable by the
agent's group only. :func:`unpack` refuses anything but exactly the files the manifest
lists, each with its digest: a truncated copy, a file swapped on the way or a stray
path cannot get through. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FORMAT = "edgefleet-provisioning-bundle"
VERSION = 1
MANIFEST = "manifest.json"
AGENT_CONFIG = "agent.toml"
# A bundle holds a config and a few certificates: anything bigger is not one.
MAX_BUNDLE_BYTES = 1 << 20
MAX_FILES = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


class BundleError(ValueError):
    """A file that is not an intact provisioning bundle; the message says what is wrong."""


@dataclass(frozen=True)
class Bundle:
    device_id: str
    files: Mapping[str, bytes]
    secret: frozenset[str]


def pack(device_id: str, files: Mapping[str, bytes], secret: Iterable[str] = ()) -> bytes:
    secret = frozenset(secret)
    if AGENT_CONFIG not in files:
        raise BundleError(f"a bundle needs {AGENT_CONFIG}")
    for name in files:
        _check_name(name)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "device_id": device_id,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "secret": name in secret}
            for name, data in sorted(files.items())
        },
    }
    out = io.BytesIO()
    # mtime 0 everywhere: the same inputs give the same bytes.
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        entries = [(MANIFEST, json.dumps(manifest, indent=2).encode()), *sorted(files.items())]
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600 if name in secret else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack(data: bytes) -> Bundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{len(data)} bytes is more than a bundle holds ({MAX_BUNDLE_BYTES})")
    members = _members(data)
    raw = members.pop(MANIFEST, None)
    if raw is None:
        raise BundleError(f"no {MANIFEST}: not a provisioning bundle")
    try:
        manifest = json.loads(raw)
    except (UnicodeError, ValueError) as exc:
        raise BundleError(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} does not describe an {FORMAT}")
    if manifest.get("version") != VERSION:
        raise BundleError(f"bundle version {manifest.get('version')!r}; this agent reads version {VERSION}")
    device_id, listed = manifest.get("device_id"), manifest.get("files")
    if not isinstance(device_id, str) or not device_id or not isinstance(listed, dict):
        raise BundleError(f"{MANIFEST} lacks device_id or files")
    missing = sorted(set(listed) - set(members))
    extra = sorted(set(members) - set(listed))
    if missing or extra:
        raise BundleError(f"files do not match the manifest: missing {missing}, not listed {extra}")
    secret = set()
    for name, entry in listed.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if hashlib.sha256(members[name]).hexdigest() != digest:
            raise BundleError(f"{name} does not match its digest in the manifest: the bundle is corrupt")
        if entry.get("secret") is True:
            secret.add(name)
    if AGENT_CONFIG not in members:
        raise BundleError(f"no {AGENT_CONFIG} in the bundle")
    return Bundle(device_id, members, frozenset(secret))


def _members(data: bytes) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for info in tar:
                if len(members) >= MAX_FILES + 1:
                    raise BundleError(f"more than {MAX_FILES} files")
                if not info.isfile():
                    raise BundleError(f"{info.name!r} is not a plain file")
                _check_name(info.name)
                if info.name in members:
                    raise BundleError(f"{info.name} appears twice")
                extracted = tar.extractfile(info)
                assert extracted is not None
                members[info.name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleError(f"not a readable gzip'd tar ({exc}): the bundle is corrupt or truncated") from None
    return members


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise BundleError(f"{name!r} is not a plain file name")
