"""The closed loop with real processes: drift on the devices' inputs is detected
from their telemetry, the retraining policy fires, the shipped retraining job
retrains on the captured data, registers a version, the policy's canary rollout
puts it on the agents, and the new version's drift score is back to normal.

Real: mosquitto, the controller process, two agent processes serving the model
over gRPC, the retraining job's webhook server (examples/retrain_job.py).

The agent's service does not yet feed its inferences to ``agent.drift_sketch``
and ``agent.capture`` (issue 5 owns that wiring), so each device's replay loop
here does what the tenant pipeline will: it replays digits through the agent's
real Infer, sketches and captures with those agent modules, with the drift spec
and capture policy the controller publishes, and sends telemetry and capture
chunks with the device's own broker credentials. It also plays the labelling
service: it knows the replayed samples' true classes and attaches them to each
data set it uploaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic
from google.protobuf.json_format import ParseDict
from sklearn.datasets import load_digits

from agent.capture import Capturer
from agent.drift_sketch import Sketcher
from tests.broker import Broker
from tests.localfleet import Agent, Controller, from_tensor, register_agent, rollout_done, wait_until
from tests.models import digits_classifier
from tests.mqtt_peer import Peer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "closed-loop-secret-0123"
DEVICES = ("cam-0", "cam-1")
THRESHOLD = 0.25


def load_job() -> Any:
    spec = importlib.util.spec_from_file_location("retrain_job", ROOT / "examples" / "retrain_job.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrain_job"] = module
    spec.loader.exec_module(module)
    return module


class Replay(threading.Thread):
    """One device's sensor replay: digits through the agent, sketches and captures to the controller."""

    def __init__(self, agent: Agent, controller: Controller, drifted: threading.Event, seed: int) -> None:
        super().__init__(name=f"replay-{agent.device_id}", daemon=True)
        self.agent, self.controller, self.drifted = agent, controller, drifted
        self.x, self.y = load_digits(return_X_y=True)
        self.rng = np.random.default_rng(seed)
        self.stopping = threading.Event()
        self.versions: list[str] = []
        self.errors: list[str] = []
        mqtt = tomllib.loads(agent.config.read_text())["mqtt"]
        self.peer = Peer(
            mqtt["port"], mqtt["username"], mqtt["password"], client_id=f"{agent.device_id}-replay"
        )
        self.sketcher = Sketcher()
        self.specs: dict[str, fleet_pb2.DriftSpec | None] = {}
        self.capturers: dict[str, tuple[Capturer, list[int]]] = {}
        self.unlabelled: dict[str, list[int]] = {}
        self.seq = 10**9

    def spec(self, version: str) -> fleet_pb2.DriftSpec | None:
        if self.specs.get(version) is None:
            r = self.controller.api("GET", f"/v1/models/digits/versions/{version}/drift/spec")
            self.specs[version] = ParseDict(r.json(), fleet_pb2.DriftSpec()) if r.status_code == 200 else None
            self.sketcher.set_specs([s for s in self.specs.values() if s is not None])
        return self.specs[version]

    def capturer(self, version: str, spec: fleet_pb2.DriftSpec) -> tuple[Capturer, list[int]]:
        if version not in self.capturers:
            doc = self.controller.api("GET", "/v1/models/digits/capture-policy").json()
            policy = fleet_pb2.CapturePolicy(
                tenant="default",
                model_name="digits",
                **{k: doc[k] for k in ("policy_id", "drifted_feature_share", "max_samples_per_upload")},
            )
            self.capturers[version] = (Capturer(policy, version, spec=spec), [])
        return self.capturers[version]

    def run(self) -> None:
        last_telemetry = time.monotonic()
        try:
            while not self.stopping.is_set():
                self.step()
                if time.monotonic() - last_telemetry >= 0.5:
                    last_telemetry = time.monotonic()
                    self.report()
                self.stopping.wait(0.1)
        except Exception as exc:  # surfaced by the test, not lost in a thread
            self.errors.append(repr(exc))
            raise

    def step(self) -> None:
        idx = self.rng.integers(0, len(self.x), 32)
        x = (16.0 - self.x[idx] if self.drifted.is_set() else self.x[idx]).astype(np.float32)
        response = self.agent.infer({"X": x})
        version = response.model_version
        self.versions.append(version)
        probs = from_tensor(response.outputs["probabilities"])
        spec = self.spec(version)
        if spec is None:
            return
        self.sketcher.observe("default", "digits", version, x, probs)
        capturer, labels = self.capturer(version, spec)
        for row, p, label in zip(x, probs, self.y[idx], strict=True):
            if capturer.offer(row, p):
                labels.append(int(label))
        if capturer.ready():
            chunks = capturer.take_upload()
            for chunk in chunks:
                self.peer.publish(str(Topic(self.agent.device_id, Kind.CAPTURE)), encode(chunk))
            self.unlabelled[chunks[0].sha256] = labels[:]
            labels.clear()

    def report(self) -> None:
        now = int(time.time() * 1000)
        self.seq += 1
        msg = fleet_pb2.Telemetry(
            device_id=self.agent.device_id, seq=self.seq, window_start_ms=now - 500, window_end_ms=now
        )
        msg.drift.extend(self.sketcher.drain())
        if msg.drift:
            self.peer.publish(str(Topic(self.agent.device_id, Kind.TELEMETRY)), encode(msg))
        for digest, labels in list(self.unlabelled.items()):
            r = self.controller.api("PUT", f"/v1/datasets/{digest}/labels", json={"labels": labels})
            if r.status_code == 200:
                del self.unlabelled[digest]

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.peer.close()


def fleet_psi(controller: Controller, version: str, since_ms: int) -> list[float]:
    body = controller.api("GET", f"/v1/models/digits/versions/{version}/drift", params={"since_ms": since_ms})
    return [w["psi"] for w in body.json()["fleet"]] if body.status_code == 200 else []


def test_drift_is_detected_retrained_and_redeployed_without_an_operator(
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
    agents: list[Agent] = []
    replays: list[Replay] = []
    job_module = load_job()
    server = None
    drifted = threading.Event()
    try:
        controller.start()
        digits = digits_classifier(tmp_path / "digits.onnx")
        controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
        reference = tmp_path / "reference.npz"
        np.savez(reference, inputs=load_digits(return_X_y=True)[0][:400].astype(np.float32))
        controller.cli("drift", "baseline", "digits", "1", "--reference", str(reference))
        assert controller.api(
            "PUT",
            "/v1/models/digits/capture-policy",
            json={
                "drifted_feature_share": 0.3,
                "max_samples_per_upload": 100,
                "max_samples_per_hour": 100_000,
            },
        ).is_success
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

        replays = [Replay(a, controller, drifted, seed=i) for i, a in enumerate(agents)]
        for r in replays:
            r.start()
        steady_since = int(time.time() * 1000)
        calm = wait_until(
            lambda: (s := fleet_psi(controller, "1", steady_since)) and len(s) >= 3 and s,
            60,
            "steady windows",
        )
        assert max(calm) < THRESHOLD, calm
        print(f"\nsteady PSI on v1: {[round(v, 3) for v in calm]}")
        assert controller.api("GET", "/v1/retraining/runs").json() == []

        drifted.set()
        onset = time.monotonic()
        onset_ms = int(time.time() * 1000)
        run = wait_until(
            lambda: next(iter(controller.api("GET", "/v1/retraining/runs").json()), None),
            120,
            "the policy to fire",
        )
        fired_after = time.monotonic() - onset
        assert run["fired"][0]["condition"] == "drift" and min(run["fired"][0]["values"]) > THRESHOLD

        done = wait_until(
            lambda: (
                (r := controller.api("GET", f"/v1/retraining/runs/{run['id']}").json())["status"]
                in ("succeeded", "failed")
                and r
            ),
            240,
            "the retraining job to report",
        )
        assert done["status"] == "succeeded", done
        new_version = done["result_version"]
        wait_until(
            lambda: all(r.versions and r.versions[-1] == new_version for r in replays),
            240,
            "the new version serving everywhere",
        )
        serving_after = time.monotonic() - onset

        registered = controller.api("GET", f"/v1/models/digits/versions/{new_version}").json()
        assert registered["lineage"]["parent_version"] == "1"
        assert registered["metadata"]["retraining_run"] == run["id"]
        captured = registered["metadata"]["datasets"]
        assert captured and all(
            controller.api("GET", f"/v1/datasets/{d}").json()["manifest"]["device_id"] in DEVICES
            for d in captured
        )
        assert (
            hashlib.sha256("\n".join(sorted(captured)).encode()).hexdigest()
            == registered["lineage"]["dataset_digest"]
        )

        serving_ms = int(time.time() * 1000)
        recovered = wait_until(
            lambda: (s := fleet_psi(controller, new_version, serving_ms)) and len(s) >= 3 and s,
            60,
            "new version drift windows",
        )
        assert max(recovered[1:]) < THRESHOLD, recovered
        drifted_v1 = fleet_psi(controller, "1", onset_ms)
        assert drifted_v1 and max(drifted_v1) > THRESHOLD
        print(
            f"\nclosed loop: drift onset -> policy fired {fired_after:.1f} s; "
            f"-> new model {new_version} serving on every device {serving_after:.1f} s; "
            f"PSI {max(drifted_v1):.2f} on v1 under drift, {max(recovered[1:]):.3f} on {new_version}"
        )
        for r in replays:
            assert not r.errors, r.errors
    finally:
        for r in replays:
            r.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
        for a in agents:
            a.stop()
        controller.stop()
