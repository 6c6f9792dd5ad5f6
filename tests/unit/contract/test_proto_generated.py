"""The committed generated modules must be exactly what the .proto sources give."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PKG = REPO / "proto" / "edgefleet_proto"


def test_regenerating_gives_no_diff(tmp_path: Path) -> None:
    env_path = Path(sys.executable).parent
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PATH": f"{env_path}:/usr/bin:/bin"},
    )
    generated = sorted(p.name for p in (tmp_path / "edgefleet_proto").iterdir())
    committed = sorted(p.name for p in PKG.iterdir() if "_pb2" in p.name)
    assert generated == committed
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "edgefleet_proto", PKG, generated, shallow=False)
    assert mismatch == [] and errors == [], f"regenerate with scripts/gen_proto.sh: {mismatch or errors}"
