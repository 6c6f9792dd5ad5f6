"""A retraining job for EdgeFleet's retraining policies (the digits classifier).

It receives a policy run (a webhook POST whose HMAC-SHA256 signature it checks,
or the same JSON on stdin for a ``command`` trigger), downloads the run's
captured data sets and their labels through the controller's API, retrains the
scikit-learn model with a small hyperparameter search, converts the winner to
ONNX with skl2onnx and registers it with lineage (data set digests, parent
version, policy run id), sets the new version's drift baseline from the
captured inputs (what the devices see now), then reports the version to the run, which starts the
policy's rollout.

Device-aware tuning: a candidate must fit the target device profile's model
size budget (``[memory].model_budget_mb`` of a firmware_profiles/*.toml, of
which a model may use ``--size-share``) and the latency budget
(``--latency-budget-ms``), measured with onnxruntime on this machine and
scaled by the ratio of this machine's CPU clock to the profile's
(``[cpu].max_frequency_mhz``), a rough but honest first-order estimate. Among
the candidates that fit, the most accurate on held-out captured samples wins;
latency and size break ties.

    python examples/retrain_job.py serve --port 8099 --controller-url http://127.0.0.1:8080 \\
        --profile firmware_profiles/raspberry-pi-zero-2-w.toml    # token/secret from the environment
    python examples/retrain_job.py once < payload.json             # for a command trigger

Environment: EDGEFLEET_TOKEN (API token), EDGEFLEET_WEBHOOK_SECRET (the policy's secret).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import logging
import os
import queue
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from skl2onnx import to_onnx
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("retrain_job")

SIGNATURE_HEADER = "X-EdgeFleet-Signature"
CODE_VERSION = "examples/retrain_job.py@1"


# -- pure parts ---------------------------------------------------------------------


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


@dataclass(frozen=True)
class Budget:
    size_bytes: int
    latency_ms: float
    # Multiply a latency measured here by this to estimate it on the device.
    device_slowdown: float

    @classmethod
    def from_profile(cls, path: Path, latency_ms: float, size_share: float) -> Budget:
        profile = tomllib.loads(path.read_text())
        budget_mb = float(profile["memory"]["model_budget_mb"])
        device_mhz = float(profile.get("cpu", {}).get("max_frequency_mhz", 0) or 0)
        freq = psutil.cpu_freq()
        host_mhz = float(freq.max or freq.current) if freq else 0.0
        slowdown = host_mhz / device_mhz if device_mhz and host_mhz else 1.0
        return cls(int(budget_mb * size_share * 1024 * 1024), latency_ms, max(slowdown, 1.0))


@dataclass(frozen=True)
class Result:
    name: str
    params: dict[str, Any]
    accuracy: float
    size_bytes: int
    latency_ms: float  # estimated on the device
    fits: bool
    onnx: bytes = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "candidate": self.name,
            "params": self.params,
            "accuracy": round(self.accuracy, 4),
            "size_bytes": self.size_bytes,
            "device_latency_ms": round(self.latency_ms, 4),
            "fits": self.fits,
        }


def candidates() -> list[tuple[str, Any]]:
    """A deliberately small search: three families whose size and speed differ a lot."""
    return [
        *(
            (f"logreg C={c}", make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300)))
            for c in (0.1, 1.0)
        ),
        *(
            (f"forest n={n} depth={d}", RandomForestClassifier(n_estimators=n, max_depth=d, random_state=0))
            for n, d in ((30, 10), (150, None))
        ),
        ("knn k=3", KNeighborsClassifier(n_neighbors=3)),
    ]


def choose(results: list[Result]) -> Result | None:
    """The most accurate candidate within budget; then the faster, then the smaller."""
    fitting = [r for r in results if r.fits]
    if not fitting:
        return None
    return max(fitting, key=lambda r: (round(r.accuracy, 3), -r.latency_ms, -r.size_bytes))


def measure_latency_ms(model: bytes, sample: np.ndarray, runs: int = 50) -> float:
    """Median single-sample latency of the ONNX model in onnxruntime on this machine."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: sample[:1].astype(np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def onnx_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    probs = session.run([names[-1]], {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return float(np.mean(np.asarray(probs).argmax(axis=1) == y))


def search(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, budget: Budget
) -> list[Result]:
    results = []
    for name, estimator in candidates():
        model = clone(estimator).fit(x_train, y_train)
        onx = to_onnx(
            model, x_train[:1].astype(np.float32), options={id(model): {"zipmap": False}}, target_opset=17
        )
        data = onx.SerializeToString()
        # Accuracy of the converted model, the thing that will run on the device.
        acc = onnx_accuracy(data, x_val, y_val)
        latency = measure_latency_ms(data, x_val) * budget.device_slowdown
        fits = len(data) <= budget.size_bytes and latency <= budget.latency_ms
        params = {k: v for k, v in estimator.get_params().items() if isinstance(v, int | float | str | None)}
        results.append(Result(name, params, acc, len(data), latency, fits, data))
        log.info(
            "candidate %s", " ".join(f"{k}={v}" for k, v in results[-1].summary().items() if k != "params")
        )
    return results


def training_set_digest(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


# -- I/O -----------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, token: str, client: httpx.Client | None = None) -> None:
        self.client = client or httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content


@dataclass
class Job:
    api: Api
    budget: Budget
    base_samples: int = 1500  # bundled digits rows kept in training, so the old distribution is not forgotten
    on_done: Callable[[dict[str, Any]], None] = lambda outcome: None

    def captured(self, payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        xs, ys, used, labels = [], [], [], []
        for ds in payload["datasets"]:
            # Asked now, not taken from the payload: labels may come after the run fired.
            found = self.api.get(f"/v1/datasets/{ds['digest']}/labels")["labels"]
            if found is None:
                log.warning(
                    "data set skipped digest=%s reason=no labels (edgefleet datasets label)", ds["digest"]
                )
                continue
            with np.load(io.BytesIO(self.api.get(ds["download"])), allow_pickle=False) as npz:
                x = np.asarray(npz["inputs"], dtype=np.float32).reshape(len(npz["inputs"]), -1)
            xs.append(x)
            ys.append(np.asarray(found))
            used.append(ds["digest"])
            labels.append(self.api.get(f"/v1/datasets/{ds['digest']}")["labels_digest"])
        if not xs:
            raise RuntimeError(
                "the run's data sets hold no labelled samples; label them and fire the policy again"
            )
        return np.vstack(xs), np.concatenate(ys), used, labels

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        run_id, model = payload["run_id"], payload["model"]
        x_cap, y_cap, used, labels = self.captured(payload)
        x_base, y_base = load_digits(return_X_y=True)
        x_ct, x_cv, y_ct, y_cv = train_test_split(x_cap, y_cap, test_size=0.3, random_state=0)
        x_train = np.vstack([x_base[: self.base_samples], x_ct]).astype(np.float32)
        y_train = np.concatenate([y_base[: self.base_samples], y_ct])
        results = search(x_train, y_train, x_cv, y_cv, self.budget)
        best = choose(results)
        if best is None:
            raise RuntimeError("no candidate fits the device's size and latency budgets")
        version = f"{model['version']}.r{run_id[:8]}"
        metrics = {
            "accuracy_captured_holdout": best.accuracy,
            "onnx_bytes": best.size_bytes,
            "device_latency_ms": best.latency_ms,
            "candidate": best.name,
        }
        metadata = {
            "retraining_run": run_id,
            "policy": payload["policy"],
            "datasets": used,
            "labels_digests": labels,
            "search": [r.summary() for r in results],
        }
        response = self.api.client.post(
            f"/v1/models/{model['name']}/versions",
            data={
                "version": version,
                "metadata": json.dumps(metadata),
                "parent_version": model["version"],
                "dataset_digest": training_set_digest(used),
                "code_version": CODE_VERSION,
                "metrics": json.dumps(metrics),
            },
            files={"file": ("model.onnx", best.onnx, "application/octet-stream")},
        )
        response.raise_for_status()
        # The new version's drift baseline is what the devices captured, i.e. what they
        # see now, not what the parent was trained on.
        baseline = self.api.client.put(
            f"/v1/models/{model['name']}/versions/{version}/drift/baseline",
            json={"reference": {"inputs": x_cap.tolist()}},
        )
        baseline.raise_for_status()
        result = self.api.client.post(payload["report_to"], json={"version": version})
        result.raise_for_status()
        outcome = {"run_id": run_id, "version": version, **metrics, "rollout_id": result.json()["rollout_id"]}
        log.info("retrained %s", " ".join(f"{k}={v}" for k, v in outcome.items()))
        self.on_done(outcome)
        return outcome


def serve(job: Job, secret: str, host: str, port: int) -> ThreadingHTTPServer:
    """Answer 202 at once (the controller's webhook timeout is short) and train on a worker."""
    jobs: queue.Queue[dict[str, Any]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not verify_signature(secret, body, self.headers.get(SIGNATURE_HEADER, "")):
                log.warning("webhook refused reason=bad signature")
                self._answer(401, b"bad signature")
                return
            try:
                payload = json.loads(body)
            except json.JSONDecodeError:
                self._answer(400, b"not JSON")
                return
            jobs.put(payload)
            self._answer(202, b"accepted")

        def _answer(self, code: int, text: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: Any) -> None:
            pass

    def work() -> None:
        while True:
            payload = jobs.get()
            try:
                job.run(payload)
            except Exception:
                log.exception("retraining failed run=%s", payload.get("run_id"))

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=work, name="retrain", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("serve", "once"))
    parser.add_argument("--controller-url", default=os.environ.get("EDGEFLEET_URL", "http://127.0.0.1:8080"))
    parser.add_argument(
        "--profile",
        type=Path,
        default=Path(__file__).parent.parent / "firmware_profiles" / "raspberry-pi-zero-2-w.toml",
    )
    parser.add_argument("--latency-budget-ms", type=float, default=5.0)
    parser.add_argument(
        "--size-share", type=float, default=0.05, help="share of model_budget_mb one model may use"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    # httpx logs every request at INFO; the job's own lines say what it did.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = os.environ.get("EDGEFLEET_TOKEN", "")
    budget = Budget.from_profile(args.profile, args.latency_budget_ms, args.size_share)
    log.info(
        "budget size_bytes=%d latency_ms=%.2f device_slowdown=%.2f",
        budget.size_bytes,
        budget.latency_ms,
        budget.device_slowdown,
    )
    job = Job(Api(args.controller_url, token), budget)
    if args.mode == "once":
        print(json.dumps(job.run(json.load(sys.stdin))))
        return 0
    secret = os.environ.get("EDGEFLEET_WEBHOOK_SECRET", "")
    if len(secret) < 16:
        parser.error("set EDGEFLEET_WEBHOOK_SECRET to the policy's webhook secret")
    server = serve(job, secret, args.host, args.port)
    log.info("retrain job ready url=http://%s:%d", args.host, server.server_address[1])
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
