"""A retraining policy through the real controller: drift from device telemetry
fires it, the webhook gets a signed payload naming the captured data sets, the
pipeline's result starts a rollout; versions, cooldown and /metrics follow."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic
from google.protobuf.json_format import ParseDict

from agent.drift_sketch import build_sketch
from controller.retraining_triggers import verify
from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, running
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until
from tests.support.webhook import Hook

SECRET = "retrain-secret-0123456789"


@pytest.fixture
def quiet_ctl(broker: Broker, tmp_path: Path) -> Iterator[Ctl]:
    """A controller whose maintenance thread stays out of the way: the test evaluates policies itself."""
    settings, token = init_controller(broker, tmp_path / "controller")
    with running(broker, settings.with_changes(maintenance_interval_s=3600.0), token) as c:
        yield c


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook([502])  # the first call fails: the run must retry
    yield h
    h.close()


def npz(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, inputs=x.astype(np.float32))
    return buf.getvalue()


def test_drift_fires_the_policy_and_the_result_rolls_out(quiet_ctl: Ctl, hook: Hook, tmp_path: Path) -> None:
    ctl = quiet_ctl
    digits = digits_classifier(tmp_path / "digits.onnx")
    x = digits.samples
    assert ctl.upload(digits.path, "digits", "1").status_code == 201
    reference = {"inputs": x[:150].tolist()}
    assert ctl.api(
        "PUT", "/v1/models/digits/versions/1/drift/baseline", json={"reference": reference}
    ).is_success
    spec = ParseDict(ctl.api("GET", "/v1/models/digits/versions/1/drift/spec").json(), fleet_pb2.DriftSpec())
    uploaded = ctl.api(
        "POST",
        "/v1/datasets",
        data={"model": "digits", "version": "1", "device_id": "cam-1", "policy_id": "random"},
        files={"file": ("captured.npz", npz(16.0 - x[150:170]), "application/octet-stream")},
    )
    assert uploaded.status_code == 201, uploaded.text
    # The policy's rollout names cam-1: it must be registered when the policy is saved.
    credentials = ctl.register("cam-1")
    doc = {
        "model": "digits",
        "conditions": {"drift": {"threshold": 0.25, "windows": 2}},
        "cooldown_s": 3600,
        "trigger": {"kind": "webhook", "url": hook.url, "secret": SECRET, "max_attempts": 3},
        "rollout": {
            "devices": ["cam-1"],
            "waves": [{"percent": 100, "soak_s": 0}],
            "failure_action": "rollback",
        },
    }
    created = ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=doc)
    assert created.status_code == 200 and created.json()["version"] == 1
    assert "secret" not in created.json()["trigger"]
    bad = ctl.api("PUT", "/v1/retraining/policies/digits-drift", json={**doc, "cooldown_s": -1})
    assert bad.status_code == 422 and "cooldown_s" in bad.text
    assert ctl.api("GET", "/v1/retraining/policies/digits-drift").json()["version"] == 1
    bad_rollout = ctl.api("PUT", "/v1/retraining/policies/x", json={**doc, "rollout": {"waves": "soon"}})
    assert bad_rollout.status_code == 422 and "body.rollout.waves" in bad_rollout.text

    peer = ctl.device_peer(credentials)
    try:
        # Two closed fleet-wide windows of drifted inputs (long ago, so they are complete).
        for seq, end in enumerate((60_005, 120_005)):
            msg = fleet_pb2.Telemetry(device_id="cam-1", seq=seq, window_start_ms=end - 5, window_end_ms=end)
            msg.drift.append(build_sketch(spec, 16.0 - x[150:]))
            peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(msg))
        wait_until(
            lambda: len(ctl.api("GET", "/v1/models/digits/versions/1/drift").json()["fleet"]) == 2,
            20,
            "windows",
        )
    finally:
        peer.close()
    # The scan starts 24 h back on a first evaluation; the windows above are older: look at everything.
    ctl.controller.closed_loop.retraining.clock = lambda: 200.0

    (run,) = ctl.api("POST", "/v1/retraining/evaluate").json()
    assert run["policy_version"] == 1 and run["model_version"] == "1" and run["status"] == "pending"
    assert run["fired"][0]["condition"] == "drift" and len(run["fired"][0]["values"]) == 2
    assert run["datasets"] == [uploaded.json()["digest"]]

    headers, body = hook.wait(2, 30)[-1]
    assert verify(SECRET, body, headers["X-EdgeFleet-Signature"])
    payload = json.loads(body)
    assert payload["run_id"] == run["id"] and payload["model"] == {"name": "digits", "version": "1"}
    assert payload["policy"] == {"name": "digits-drift", "version": 1}
    assert payload["datasets"][0]["download"] == f"/v1/datasets/{run['datasets'][0]}/download"
    triggered = wait_until(
        lambda: (
            (r := ctl.api("GET", f"/v1/retraining/runs/{run['id']}").json())["status"] == "triggered" and r
        ),
        10,
        "run triggered",
    )
    assert "after 2 attempt" in triggered["detail"]

    # Cooldown: nothing fires again; a new policy version is recorded but older runs keep theirs.
    assert ctl.api("POST", "/v1/retraining/evaluate").json() == []
    assert (
        ctl.api("PUT", "/v1/retraining/policies/digits-drift", json={**doc, "cooldown_s": 10}).json()[
            "version"
        ]
        == 2
    )
    assert [p["version"] for p in ctl.api("GET", "/v1/retraining/policies/digits-drift/versions").json()] == [
        1,
        2,
    ]

    assert (
        ctl.api("POST", f"/v1/retraining/runs/{run['id']}/result", json={"version": "2"}).status_code == 404
    )
    assert (
        ctl.upload(digits.path, "digits", "2", metadata=json.dumps({"retraining_run": run["id"]})).status_code
        == 201
    )
    result = ctl.api("POST", f"/v1/retraining/runs/{run['id']}/result", json={"version": "2"}).json()
    assert result["run"]["status"] == "succeeded" and result["run"]["result_version"] == "2"
    rollout = ctl.api("GET", f"/v1/rollouts/{result['rollout_id']}").json()
    assert rollout["version"] == "2" and [d["device_id"] for d in rollout["devices"]] == ["cam-1"]
    assert (
        'edgefleet_retraining_runs_total{policy="digits-drift",status="succeeded"} 1.0'
        in ctl.api("GET", "/metrics").text
    )


def load_job_module() -> Any:
    path = Path(__file__).parents[3] / "examples" / "retrain_job.py"
    spec = importlib.util.spec_from_file_location("retrain_job", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrain_job"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_shipped_retraining_job_retrains_on_captured_data_and_registers_with_lineage(
    quiet_ctl: Ctl, tmp_path: Path
) -> None:
    ctl = quiet_ctl
    job_module = load_job_module()
    digits = digits_classifier(tmp_path / "digits.onnx")
    x, y = digits.samples, digits.labels
    assert ctl.upload(digits.path, "digits", "1").status_code == 201
    assert ctl.api(
        "PUT", "/v1/models/digits/versions/1/drift/baseline", json={"reference": {"inputs": x[:150].tolist()}}
    ).is_success
    drifted = 16.0 - x  # the camera now sees inverted digits
    up = ctl.api(
        "POST",
        "/v1/datasets",
        data={"model": "digits", "version": "1", "device_id": "cam-1", "policy_id": "drifted"},
        files={"file": ("c.npz", npz(drifted[:240]), "application/octet-stream")},
    ).json()
    assert ctl.api("PUT", f"/v1/datasets/{up['digest']}/labels", json={"labels": y[:240].tolist()}).is_success

    done: list[dict[str, Any]] = []
    finished = threading.Event()
    ctl.client.headers["Authorization"] = f"Bearer {ctl.token}"
    budget = job_module.Budget.from_profile(
        Path(__file__).parents[3] / "firmware_profiles" / "raspberry-pi-zero-2-w.toml", 50.0, 0.05
    )
    job = job_module.Job(job_module.Api("", "", client=ctl.client), budget)

    def on_done(outcome: dict[str, Any]) -> None:
        done.append(outcome)
        finished.set()

    job.on_done = on_done
    server = job_module.serve(job, SECRET, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        doc = {
            "model": "digits",
            "conditions": {"schedule": {"every_s": 86_400}},
            "trigger": {"kind": "webhook", "url": url, "secret": SECRET},
        }
        assert ctl.api("PUT", "/v1/retraining/policies/nightly", json=doc).is_success
        (run,) = ctl.api("POST", "/v1/retraining/evaluate").json()
        assert finished.wait(120), "the job never reported"
    finally:
        server.shutdown()
        server.server_close()
    (outcome,) = done
    version = ctl.api("GET", f"/v1/models/digits/versions/{outcome['version']}").json()
    assert version["lineage"]["parent_version"] == "1" and version["lineage"]["code_version"].startswith(
        "examples/"
    )
    assert version["metadata"]["retraining_run"] == run["id"] and version["metadata"]["datasets"] == [
        up["digest"]
    ]
    assert version["metadata"]["policy"] == {"name": "nightly", "version": 1}
    assert len(version["metadata"]["search"]) >= 4
    assert ctl.api("GET", f"/v1/retraining/runs/{run['id']}").json()["status"] == "succeeded"
    new_baseline = ctl.api("GET", f"/v1/models/digits/versions/{outcome['version']}/drift/baseline").json()
    assert new_baseline["ready"] and new_baseline["source"] == "reference"
    # The retrained model reads inverted digits; the old one does not.
    held_out = drifted[240:], y[240:]
    old = job_module.onnx_accuracy(digits.path.read_bytes(), *held_out)
    new_bytes = ctl.controller.artifacts.path(version["digest"]).read_bytes()
    assert job_module.onnx_accuracy(new_bytes, *held_out) > max(0.8, old + 0.3)
