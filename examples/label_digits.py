"""Label the digits the devices captured, as a labelling team would.

    python examples/label_digits.py --files DIR [--min-samples 100] [--timeout 300]

Waits until the devices have captured at least ``--min-samples`` images for the model
``digits`` (data sets whose device is not ``operator``), then gives each unlabelled one
its ground truth: the true class of every captured image, looked up in the files the
devices replay (``steady.csv``, ``drifted.csv`` and ``labels.csv`` from
examples/make_digits.py in DIR). In production the labels come from people or a
labelling tool; attaching them is the same call, ``PUT /v1/datasets/{digest}/labels``,
or ``edgefleet datasets label DIGEST --labels labels.json`` with ``[3, 7, ...]``, one
class per sample in the data set's order (``edgefleet datasets download DIGEST -o
FILE.npz`` gets the samples).

The controller is found through EDGEFLEET_URL and EDGEFLEET_TOKEN, as for `edgefleet`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MODEL = "digits"


def truth(folder: Path) -> dict[bytes, int]:
    """Each replayed image (steady or inverted) and its class."""
    labels = np.loadtxt(folder / "labels.csv", delimiter=",", skiprows=1, dtype=np.int64)[:, 1]
    known: dict[bytes, int] = {}
    for name in ("steady.csv", "drifted.csv"):
        rows = np.loadtxt(folder / name, delimiter=",", dtype=np.float32, ndmin=2)
        for row, label in zip(rows, labels, strict=True):
            known.setdefault(row.tobytes(), int(label))
    return known


def captured(api: httpx.Client) -> list[dict[str, Any]]:
    """The model's data sets the devices uploaded (not the operator's own uploads)."""
    response = api.get("/v1/datasets", params={"model": MODEL})
    response.raise_for_status()
    return [d for d in response.json() if d["manifest"]["device_id"] != "operator"]


def label(api: httpx.Client, dataset: dict[str, Any], known: dict[bytes, int]) -> int:
    raw = api.get(f"/v1/datasets/{dataset['digest']}/download")
    raw.raise_for_status()
    with np.load(io.BytesIO(raw.content), allow_pickle=False) as npz:
        inputs = np.asarray(npz["inputs"], np.float32).reshape(len(npz["inputs"]), -1)
    labels = [known[row.tobytes()] for row in inputs]
    api.put(f"/v1/datasets/{dataset['digest']}/labels", json={"labels": labels}).raise_for_status()
    return len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=Path, default=Path("."), help="where make_digits.py wrote its files")
    parser.add_argument(
        "--min-samples", type=int, default=100, help="captured images to wait for (default %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this long (default 300 s)"
    )
    args = parser.parse_args(argv)
    token = os.environ.get("EDGEFLEET_TOKEN", "")
    if not token:
        parser.error("set EDGEFLEET_URL and EDGEFLEET_TOKEN as for `edgefleet` (see the README)")
    url = os.environ.get("EDGEFLEET_URL", "http://127.0.0.1:8080").rstrip("/")
    known = truth(args.files)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as api:
        deadline = time.monotonic() + args.timeout
        while (found := sum(d["samples"] for d in captured(api))) < args.min_samples:
            if time.monotonic() > deadline:
                print(f"only {found} captured samples after {args.timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(1.0)
        for dataset in captured(api):
            if not dataset["labelled"]:
                n = label(api, dataset, known)
                device = dataset["manifest"]["device_id"]
                print(f"labelled {n} samples captured on {device} (data set {dataset['digest'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
