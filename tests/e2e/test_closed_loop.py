"""The closed loop with real processes, driven by the devices' own sensors.

Real: mosquitto, the controller process, two agent processes, the retraining
job's webhook server (examples/retrain_job.py). Each agent runs a tenant on a
CSV replay (its ``agent.toml`` ``[[tenants]]``): digits at 40 rows a second,
the first rows as the model was trained on, then, from row ``STEADY_ROWS``
on, the same digits inverted (16 - x): drift injected into the replayed data.
The agents sketch every inference with the drift spec and capture samples
under the capture policy the controller puts in their desired state, and send
both themselves (telemetry windows, capture chunks through the outbox). The
controller detects the drift, the policy fires, the job retrains on the
captured data, registers a version, the policy's canary rollout puts it on
the agents and the new version's drift score is back to normal.

The one other actor is the operator attaching ground-truth labels to the
captured data sets through the API (``PUT /v1/datasets/{digest}/labels``): the
test knows the replayed rows' true classes, as a labelling team would.

Onset and serving times come from the agents' own results (StreamResults):
the drift onset is when the first inverted row was captured, the new model
serves on a device when its first result names the new version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from edgefleet_proto import inference_pb2, inference_pb2_grpc
from sklearn.datasets import load_digits

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SECRET = "closed-loop-secret-0123"
DEVICES = ("cam-0", "cam-1")
THRESHOLD = 0.25
RATE_HZ = 40
STEADY_ROWS = 12 * RATE_HZ
# Long enough to outlast the test: the replay ends, it does not loop back to steady rows.
TOTAL_ROWS = 300 * RATE_HZ


def load_job() -> Any:
    spec = importlib.util.spec_from_file_location("retrain_job", ROOT / "examples" / "retrain_job.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrain_job"] = module
    spec.loader.exec_module(module)
    return module


def replay_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's replay: random digits, inverted from row STEADY_ROWS on."""
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).integers(0, len(x), TOTAL_ROWS)
    rows = x[idx].copy()
    rows[STEADY_ROWS:] = 16.0 - rows[STEADY_ROWS:]
    return rows, y[idx]


def add_replay_tenant(agent: AgentProcess, csv: Path) -> None:
    with agent.config.open("a") as f:
        f.write(
            f"""
[[tenants]]
id = "default"
model = "digits"
rate_hz = {RATE_HZ}
queue = 8
[tenants.source]
kind = "csv"
uri = "{csv}"
[tenants.preprocess]
dtype = "float32"
"""
        )


class Results(threading.Thread):
    """The tenant's results as the agent streams them: which version served which row, when."""

    def __init__(self, agent: AgentProcess) -> None:
        super().__init__(name=f"results-{agent.device_id}", daemon=True)
        self.channel = agent.channel()
        self.call = inference_pb2_grpc.TenantResultsStub(self.channel).StreamResults(
            inference_pb2.StreamResultsRequest(tenant="default", output_names=["label"])
        )
        self.onset_ms: int | None = None
        self.first_seen: dict[str, float] = {}
        self.last_version = ""
        self.device_id = agent.device_id
        self.ended = ""
        self.results = 0
        self.last_at = 0.0

    def run(self) -> None:
        try:
            for result in self.call:
                if self.onset_ms is None and result.seq >= STEADY_ROWS:
                    self.onset_ms = result.captured_at_ms
                self.first_seen.setdefault(result.model_version, time.time())
                self.last_version = result.model_version
                self.results += 1
                self.last_at = time.time()
        except grpc.RpcError as e:
            self.ended = f"{e.code()}: {e.details()}"  # cancelled at the end, or the agent stopped

    def stop(self) -> None:
        self.call.cancel()
        self.channel.close()


class Labeller(threading.Thread):
    """The operator's labelling step: ground truth for each captured data set, through the API."""

    def __init__(self, controller: Controller, truth: dict[bytes, int]) -> None:
        super().__init__(name="labeller", daemon=True)
        self.controller, self.truth = controller, truth
        self.stopping = threading.Event()
        self.labelled: set[str] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            try:
                self.label_new()
            except Exception as exc:  # surfaced by the test, not lost in a thread
                self.errors.append(repr(exc))

    def label_new(self) -> None:
        for ds in self.controller.api("GET", "/v1/datasets", params={"model": "digits"}).json():
            # The reference set the baseline was made from is the operator's own upload.
            if ds["labelled"] or ds["digest"] in self.labelled or ds["manifest"]["device_id"] not in DEVICES:
                continue
            raw = self.controller.api("GET", f"/v1/datasets/{ds['digest']}/download").content
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                inputs = np.asarray(npz["inputs"], np.float32).reshape(len(npz["inputs"]), -1)
            labels = [self.truth[row.tobytes()] for row in inputs]
            r = self.controller.api("PUT", f"/v1/datasets/{ds['digest']}/labels", json={"labels": labels})
            r.raise_for_status()
            self.labelled.add(ds["digest"])


def fleet_windows(controller: Controller, version: str, since_ms: int) -> list[dict[str, Any]]:
    body = controller.api("GET", f"/v1/models/digits/versions/{version}/drift", params={"since_ms": since_ms})
    return list(body.json()["fleet"]) if body.status_code == 200 else []


def redeploy_story(controller: Controller, agents: list[AgentProcess], streams: list[Results]) -> str:
    """What the redeploy did, for a run where the new version did not reach every stream."""
    lines = [
        f"stream {s.device_id}: {s.results} results, the last {time.time() - s.last_at:.1f} s ago, "
        f"first seen {s.first_seen}, last {s.last_version!r}, ended {s.ended!r}"
        for s in streams
    ]
    for r in controller.api("GET", "/v1/rollouts").json():
        lines.append(
            f"rollout {r['id']}: {r['model']} {r['version']} {r['status']} {r['state']} {r['reason']}"
        )
        for e in controller.api("GET", f"/v1/rollouts/{r['id']}/events").json():
            lines.append(f"  {e}")
    for d in controller.api("GET", "/v1/devices").json():
        lines.append(f"device {d}")
    for a in agents:
        lines.append(f"--- {a.device_id} log tail\n{a.log()[-3000:]}")
    return "\n".join(lines)


@pytest.mark.timeout(600)
def test_drift_in_the_replayed_data_is_detected_retrained_and_redeployed(
    broker: Broker, tmp_path: Path
) -> None:
    controller = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    controller.init()
    settings = controller.data_dir / "controller.toml"
    text = settings.read_text().replace("rollup_window_s = 60", "rollup_window_s = 2")
    settings.write_text(text.replace("maintenance_interval_s = 10.0", "maintenance_interval_s = 0.5"))
    agents: list[AgentProcess] = []
    streams: list[Results] = []
    labeller: Labeller | None = None
    job_module = load_job()
    server = None
    try:
        controller.start()
        digits = digits_classifier(tmp_path / "digits.onnx")
        controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
        reference = tmp_path / "reference.npz"
        np.savez(reference, inputs=load_digits(return_X_y=True)[0][:400].astype(np.float32))
        controller.cli("drift", "baseline", "digits", "1", "--reference", str(reference))
        controller.cli("datasets", "capture-policy", "digits", "--drifted-feature-share", "0.3",
                       "--max-samples-per-upload", "50", "--max-samples-per-hour", "100000")  # fmt: skip
        for device_id in DEVICES:
            agents.append(register_agent(controller, tmp_path / "agents", device_id).start())
        rollout = controller.cli("rollouts", "create", "--model", "digits", "--version", "1",
                                 "--device", DEVICES[0], "--device", DEVICES[1])  # fmt: skip
        assert (
            wait_until(lambda: rollout_done(controller, rollout["id"]), 90, "v1 rollout")["status"]
            == "succeeded"
        )

        budget = job_module.Budget.from_profile(
            ROOT / "firmware_profiles" / "raspberry-pi-zero-2-w.toml", 50.0, 0.05
        )
        job = job_module.Job(job_module.Api(controller.url, controller.token), budget)
        server = job_module.serve(job, SECRET, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        policy = {
            "model": "digits",
            "conditions": {"drift": {"threshold": THRESHOLD, "windows": 2}},
            "cooldown_s": 3600,
            "trigger": {
                "kind": "webhook",
                "url": f"http://127.0.0.1:{server.server_address[1]}/",
                "secret": SECRET,
            },
            "rollout": {
                "devices": list(DEVICES),
                "waves": [{"count": 1, "soak_s": 1}, {"percent": 100}],
                "gates": {"min_inferences": 10},
                "failure_action": "rollback",
            },
        }
        assert controller.api("PUT", "/v1/retraining/policies/digits-drift", json=policy).is_success

        # The sensor app is installed: each agent restarts with its CSV replay tenant.
        truth: dict[bytes, int] = {}
        for i, agent in enumerate(agents):
            rows, labels = replay_rows(seed=i)
            csv = tmp_path / f"{agent.device_id}.csv"
            np.savetxt(csv, rows, delimiter=",", fmt="%g")
            for row, label in zip(rows.astype(np.float32), labels, strict=True):
                truth.setdefault(row.tobytes(), int(label))
            agent.stop()
            add_replay_tenant(agent, csv)
        started_ms = int(time.time() * 1000)
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_until(agent.socket.exists, 30, f"{agent.device_id} socket")
            stream = Results(agent)
            stream.start()
            streams.append(stream)
        labeller = Labeller(controller, truth)
        labeller.start()

        onset_ms = wait_until(
            lambda: min((s.onset_ms for s in streams if s.onset_ms), default=None), 60, "the drift onset"
        )
        onset = onset_ms / 1000.0
        calm = [
            w["psi"] for w in fleet_windows(controller, "1", started_ms) if w["window_end_ms"] <= onset_ms
        ]
        assert calm and max(calm) < THRESHOLD, calm
        print(f"\nsteady PSI on v1 from the agents' own sketches: {[round(v, 3) for v in calm]}")

        run = wait_until(
            lambda: next(iter(controller.api("GET", "/v1/retraining/runs").json()), None),
            60,
            "the policy to fire",
        )
        assert run["created_at"] >= onset - 1.0, "the policy fired before the drift"
        assert run["fired"][0]["condition"] == "drift" and min(run["fired"][0]["values"]) > THRESHOLD
        done = wait_until(
            lambda: (
                (r := controller.api("GET", f"/v1/retraining/runs/{run['id']}").json())["status"]
                in ("succeeded", "failed")
                and r
            ),
            120,
            "the retraining job to report",
        )
        assert done["status"] == "succeeded", done
        new_version = done["result_version"]
        # Registration, variants, a two-wave canary and the download: 42 s alone.
        try:
            wait_until(
                lambda: all(new_version in s.first_seen for s in streams),
                120,
                "the new version serving everywhere",
            )
        except TimeoutError as timed_out:
            raise AssertionError(redeploy_story(controller, agents, streams)) from timed_out
        serving_at = max(s.first_seen[new_version] for s in streams)

        registered = controller.api("GET", f"/v1/models/digits/versions/{new_version}").json()
        assert registered["lineage"]["parent_version"] == "1"
        assert registered["metadata"]["retraining_run"] == run["id"]
        captured = registered["metadata"]["datasets"]
        manifests = [controller.api("GET", f"/v1/datasets/{d}").json()["manifest"] for d in captured]
        assert captured and all(
            m["device_id"] in DEVICES and m["model_version"] == "1" and m["policy_id"] for m in manifests
        )
        assert (
            hashlib.sha256("\n".join(sorted(captured)).encode()).hexdigest()
            == registered["lineage"]["dataset_digest"]
        )

        serving_ms = int(serving_at * 1000)
        # The newest fleet window is still filling (some devices' windows, few samples, so
        # a noisy PSI): judge only the windows before it.
        recovered = wait_until(
            lambda: (
                (s := [w["psi"] for w in fleet_windows(controller, new_version, serving_ms)][:-1])
                and len(s) >= 3
                and s
            ),
            60,
            "new version drift windows",
        )
        assert max(recovered[1:]) < THRESHOLD, recovered
        drifted_v1 = [w["psi"] for w in fleet_windows(controller, "1", onset_ms)]
        assert drifted_v1 and max(drifted_v1) > THRESHOLD
        print(
            f"closed loop: drift onset -> policy fired {run['created_at'] - onset:.1f} s; "
            f"-> new model {new_version} serving on every device {serving_at - onset:.1f} s; "
            f"{len(captured)} captured data sets; PSI {max(drifted_v1):.2f} on v1 under drift, "
            f"{max(recovered[1:]):.3f} on {new_version}"
        )
        assert not labeller.errors, labeller.errors
    finally:
        if labeller is not None:
            labeller.stopping.set()
            labeller.join(10)
        for s in streams:
            s.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
        for a in agents:
            a.stop()
        controller.stop()
