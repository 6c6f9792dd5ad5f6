"""Make the files the README's walkthrough uses, from scikit-learn's bundled digits.

    python examples/make_digits.py --out DIR [--webhook-url URL] [--devices ID ...]

writes into DIR:

- ``digits-1.0.0.onnx``, ``digits-1.1.0.onnx``: small neural networks (8x8 images as 64
  floats in 0..16 -> 32 ReLU units -> ``label``, ``probabilities``), 1.1.0 trained on
  twice the data. A network rather than the logistic regression the tests use: skl2onnx
  writes a logistic regression as one ``LinearClassifier`` operator, which onnxruntime
  cannot quantize, while the network's ``MatMul`` layers have int8 kernels;
- ``calibration.npz``: 200 training images under the model's input name ``X``, from
  which the controller makes the int8 variant;
- ``reference.npz``: 400 training images as ``inputs``, the drift baseline;
- ``steady.csv`` and ``drifted.csv``: held-out images, one per row, replayed by the
  devices' tenant as a camera would feed it; ``drifted.csv`` holds them inverted
  (16 - x), as a camera remounted behind a backlit window would see them;
- ``labels.csv``: the true class of each replayed image (``row,label``: what a
  labelling team would answer for the captured samples);
- ``steady.toml`` and ``drifted.toml``: the tenant that replays each file, for
  ``edgefleet devices set-tenants``;
- ``policy.json``: a retraining policy: PSI above 0.25 in 2 fleet-wide windows calls
  the webhook (``examples/retrain_job.py serve``) signed with EDGEFLEET_WEBHOOK_SECRET,
  and the version it registers goes to ``--devices`` in a canary rollout.

Only scikit-learn, skl2onnx and numpy are needed (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

INPUT = "X"
SEED = 0
# Replayed images a second: enough for drift windows and gates within seconds.
RATE_HZ = 20


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split() -> Split:
    """A stratified split, so the held-out images are like the ones trained on."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.25, random_state=SEED, stratify=y
    )
    return Split(x_train, y_train, x_test, y_test)


def train(x: np.ndarray, y: np.ndarray) -> bytes:
    """The network as ONNX: probabilities as a plain tensor (no ZipMap), opset 17."""
    model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=1000, random_state=SEED).fit(x, y)
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    # skl2onnx names the input X; the calibration and sample files rely on that name.
    assert onx.graph.input[0].name == INPUT
    return bytes(onx.SerializeToString())


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label = session.run(["label"], {INPUT: x})[0]
    return float(np.mean(np.asarray(label) == y))


def tenant_toml(csv: Path) -> str:
    return (
        "[[tenants]]\n"
        'id = "default"\n'
        'model = "digits"\n'
        f"rate_hz = {RATE_HZ}\n"
        "[tenants.source]\n"
        'kind = "csv"\n'
        f"uri = {json.dumps(str(csv))}\n"
        'loop = "true"\n'
        "[tenants.preprocess]\n"
        'dtype = "float32"\n'
    )


def policy(webhook_url: str, secret: str, devices: list[str]) -> dict[str, object]:
    return {
        "model": "digits",
        "conditions": {"drift": {"threshold": 0.25, "windows": 2}},
        "cooldown_s": 3600,
        "trigger": {"kind": "webhook", "url": webhook_url, "secret": secret},
        "rollout": {
            "devices": devices,
            "waves": [{"count": 1, "soak_s": 5}, {"percent": 100}],
            "gates": {"min_inferences": 10, "max_error_rate": 0.02},
            "failure_action": "rollback",
        },
    }


def write_csv(path: Path, rows: np.ndarray) -> None:
    np.savetxt(path, rows, delimiter=",", fmt="%g")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="the folder to write into (default .)")
    parser.add_argument(
        "--webhook-url",
        default="http://127.0.0.1:8099/",
        help="where the policy's webhook goes: examples/retrain_job.py serve (default %(default)s)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        default=["cam-north", "cam-south"],
        help="the devices the retrained version is rolled out to (default %(default)s)",
    )
    args = parser.parse_args(argv)
    secret = os.environ.get("EDGEFLEET_WEBHOOK_SECRET", "")
    if len(secret) < 16:
        parser.error(
            "set EDGEFLEET_WEBHOOK_SECRET to a secret of 16 or more characters, e.g. "
            "export EDGEFLEET_WEBHOOK_SECRET=$(python -c 'import secrets; print(secrets.token_hex(16))'); "
            "the policy signs its webhook with it and examples/retrain_job.py checks it"
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = split()
    half = len(data.x_train) // 2
    models = {
        "1.0.0": train(data.x_train[:half], data.y_train[:half]),
        "1.1.0": train(data.x_train, data.y_train),
    }
    for version, model in models.items():
        (out / f"digits-{version}.onnx").write_bytes(model)
        print(
            f"digits-{version}.onnx: {len(model)} bytes, "
            f"accuracy {accuracy(model, data.x_test, data.y_test):.3f} on {len(data.y_test)} held-out images"
        )
    np.savez(out / "calibration.npz", **{INPUT: data.x_train[:200]})
    np.savez(out / "reference.npz", inputs=data.x_train[:400])
    write_csv(out / "steady.csv", data.x_test)
    write_csv(out / "drifted.csv", 16.0 - data.x_test)
    with (out / "labels.csv").open("w") as f:
        f.write("row,label\n")
        f.writelines(f"{i},{label}\n" for i, label in enumerate(data.y_test))
    for name in ("steady", "drifted"):
        (out / f"{name}.toml").write_text(tenant_toml((out / f"{name}.csv").resolve()))
    doc = policy(args.webhook_url, secret, args.devices)
    (out / "policy.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"calibration.npz, reference.npz, steady/drifted .csv and .toml, labels.csv, policy.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
