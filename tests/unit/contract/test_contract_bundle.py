"""The provisioning bundle's format: what pack writes unpack reads back, and nothing else."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
from edgefleet_proto.bundle import MANIFEST, BundleError, pack, unpack

FILES = {"agent.toml": b'device_id = "cam-1"\n', "cam-1.key": b"KEY", "broker-ca.crt": b"CA"}


def tar_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def entries_of(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


def test_round_trip_and_same_bytes_for_the_same_inputs() -> None:
    data = pack("cam-1", FILES, secret={"agent.toml", "cam-1.key"})
    bundle = unpack(data)
    assert (bundle.device_id, dict(bundle.files), bundle.secret) == (
        "cam-1",
        FILES,
        frozenset({"agent.toml", "cam-1.key"}),
    )
    assert pack("cam-1", FILES, secret={"agent.toml", "cam-1.key"}) == data


def test_a_truncated_bundle_is_corrupt() -> None:
    data = pack("cam-1", FILES)
    with pytest.raises(BundleError, match="corrupt or truncated"):
        unpack(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        unpack(b"not a bundle at all")


def test_a_file_changed_on_the_way_does_not_match_its_digest() -> None:
    entries = entries_of(pack("cam-1", FILES))
    entries["broker-ca.crt"] = b"ANOTHER CA"
    with pytest.raises(BundleError, match=r"broker-ca\.crt does not match its digest"):
        unpack(tar_of(entries))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("cam-1.key"), r"missing \['cam-1.key'\]"),
        (lambda e: e.update({"extra.sh": b"#!"}), r"not listed \['extra.sh'\]"),
        (lambda e: e.update({"../etc/passwd": b"x"}), "is not a plain file name"),
        (lambda e: e.pop(MANIFEST), "no manifest.json"),
        (lambda e: e.update({MANIFEST: b"{"}), "not JSON"),
        (
            lambda e: e.update({MANIFEST: json.dumps({**json.loads(e[MANIFEST]), "version": 9}).encode()}),
            "bundle version 9",
        ),
    ],
)
def test_anything_but_the_listed_files_is_refused(change: object, message: str) -> None:
    entries = entries_of(pack("cam-1", FILES))
    change(entries)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        unpack(tar_of(entries))
