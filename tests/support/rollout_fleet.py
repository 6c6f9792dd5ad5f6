"""A 20-device fleet for the rollout tests, and the model versions they roll out.

Five real agent processes and fifteen simulated devices (the agent's own session
code, each on its own broker login, in one simulator process: tests/support/fleetsim),
all registered through the controller's API. Inference traffic runs on every
device: the simulated ones run the digits samples through their serving model,
a thread sends gRPC requests to the real agents. Models are built here; nothing
is downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from edgefleet_proto import inference_pb2, inference_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from agent.tensors import from_arrays
from tests.support.agent_process import AgentProcess
from tests.support.fleetsim import DeviceLogin, SimFleet, SimSettings
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.waiting import wait_until

REAL_EVERY = 4  # dev-00, dev-04, ... are real agent processes
# Each simulated device runs this many inferences per telemetry window of 0.5 s.
SIM_INFERENCES = 10
SLOW_DEPTH = 48


def digits_samples() -> np.ndarray:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    x: np.ndarray = load_digits().data.astype(np.float32)
    return x


def classifier(path: Path, seed: int, slow: bool = False, faulty: bool = False) -> Path:
    """X[N,64] -> probabilities[N,10]; ``slow`` adds a large MatMul chain, ``faulty`` a Gather that
    goes out of range for any sample whose brightest pixel is 16 (most digits; zeros pass)."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.05) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 64, 256), init("w2", 256, 256), init("w3", 256, 10)]
    nodes = [
        helper.make_node("MatMul", ["X", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["logits0"]),
    ]
    last = "logits0"
    if slow:
        # About 150x the arithmetic of the rest, with one shared matrix so the file stays small.
        inits += [init("s0", 64, 512), init("s1", 512, 512, scale=0.02)]
        inits.append(numpy_helper.from_array(np.zeros((512, 10), np.float32), "sz"))
        nodes.append(helper.make_node("MatMul", ["X", "s0"], ["c0"]))
        for i in range(1, SLOW_DEPTH + 1):
            nodes.append(helper.make_node("MatMul", [f"c{i - 1}", "s1"], [f"c{i}"]))
        nodes += [
            helper.make_node("MatMul", [f"c{SLOW_DEPTH}", "sz"], ["cz"]),
            helper.make_node("Add", [last, "cz"], ["logits1"]),
        ]
        last = "logits1"
    if faulty:
        inits += [
            numpy_helper.from_array(np.array([4.0], np.float32), "four"),
            numpy_helper.from_array(np.zeros(4, np.float32), "table"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ]
        nodes += [
            helper.make_node("ReduceMax", ["X"], ["mx"], axes=[1], keepdims=0),
            helper.make_node("Div", ["mx", "four"], ["q"]),
            helper.make_node("Floor", ["q"], ["fq"]),
            helper.make_node("Cast", ["fq"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["g"]),
            helper.make_node("Unsqueeze", ["g", "one"], ["g2"]),
            helper.make_node("Add", [last, "g2"], ["logits2"]),
        ]
        last = "logits2"
    nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@dataclass
class Fleet:
    controller: Controller
    agents: list[AgentProcess]
    sims: list[str]
    sim_fleet: SimFleet
    samples: np.ndarray

    @property
    def ids(self) -> list[str]:
        return sorted([a.device_id for a in self.agents] + self.sims)

    def upload(self, path: Path, version: str) -> dict[str, Any]:
        out: dict[str, Any] = self.controller.cli(
            "models", "upload", str(path), "--name", "clf", "--version", version
        )
        return out

    def device(self, device_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.controller.api("GET", f"/v1/devices/{device_id}").json()
        return body

    def active_digests(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for d in self.controller.api("GET", "/v1/devices").json():
            models = (d.get("reported") or {}).get("models", [])
            out[d["device_id"]] = next((m["artifact_digest"] for m in models if m["phase"] == "active"), None)
        return out

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self.controller.api("GET", f"/v1/rollouts/{rollout_id}/events").json()
        return body

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.controller.api("GET", f"/v1/rollouts/{rollout_id}").json()
        return body

    def wait_finished(self, rollout_id: str, timeout: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            r = self.rollout(rollout_id)
            return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

        try:
            return wait_until(finished, timeout, f"rollout {rollout_id} to finish")
        except TimeoutError:
            raise AssertionError(
                f"rollout did not finish: {self.rollout(rollout_id)}\nevents: {self.events(rollout_id)}"
            ) from None

    def wait_wave(self, rollout_id: str, wave: int, timeout: float) -> None:
        def there() -> bool:
            r = self.rollout(rollout_id)
            if r["state"] != "running":
                raise AssertionError(
                    f"rollout left running before wave {wave}: {r}\n{self.events(rollout_id)}"
                )
            return bool(r["wave"] >= wave)

        wait_until(there, timeout, f"wave {wave}")

    def wait_baseline(self, version: str, min_windows: int = 2) -> None:
        """Every device has sent telemetry windows with inferences of ``version``."""

        def reporting(device_id: str) -> bool:
            rows = self.controller.api(
                "GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 20}
            ).json()
            hits = [
                m for r in rows for m in r["models"] if m["model_version"] == version and m["inference_count"]
            ]
            return len(hits) >= min_windows

        wait_until(lambda: all(reporting(d) for d in self.ids), 60, f"telemetry of version {version}")


def _drive_agents(agents: list[AgentProcess], samples: np.ndarray, stop: threading.Event) -> None:
    """gRPC traffic to the real agents; refusals are what the new version's error rate counts."""
    channels = {a.device_id: grpc.insecure_channel(f"unix:{a.socket}") for a in agents}
    stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels.values()]
    rng = np.random.default_rng(0)
    try:
        while not stop.is_set():
            for stub in stubs:
                x = samples[rng.integers(len(samples))][None, :]
                with suppress(grpc.RpcError):
                    stub.Infer(inference_pb2.InferRequest(inputs=from_arrays({"X": x})), timeout=2)
            stop.wait(0.02)
    finally:
        for c in channels.values():
            c.close()


@contextmanager
def fleet_of_20(controller: Controller, workdir: Path, agents: list[AgentProcess]) -> Iterator[Fleet]:
    samples = digits_samples()
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "samples.npy", samples)
    sims: list[str] = []
    for i in range(20):
        device_id = f"dev-{i:02}"
        if i % REAL_EVERY == 0:
            agents.append(register_agent(controller, workdir, device_id, telemetry_interval=0.5).start())
        else:
            sims.append(device_id)
    registered = controller.api(
        "POST", "/v1/device-batches", json={"devices": [{"device_id": d, "tags": ["sim"]} for d in sims]}
    )
    assert registered.status_code == 201, registered.text
    creds = registered.json()
    settings = SimSettings(
        "127.0.0.1",
        controller.broker_port,
        creds[0]["controller_public_key"],
        workdir / "sim",
        telemetry_interval_s=0.5,
        inferences_per_window=SIM_INFERENCES,
        samples=workdir / "samples.npy",
    )
    logins = [DeviceLogin(c["device_id"], c["mqtt_password"]) for c in creds]
    sim_fleet = SimFleet(logins, settings, processes=1, log_dir=workdir / "sim-logs").start()
    stop = threading.Event()
    driver = threading.Thread(target=_drive_agents, args=(agents, samples, stop), daemon=True)
    fleet = Fleet(controller, agents, sims, sim_fleet, samples)
    try:
        wait_until(
            lambda: all(d["online"] for d in controller.api("GET", "/v1/devices").json()),
            60,
            "20 devices online",
        )
        driver.start()
        yield fleet
    finally:
        stop.set()
        if driver.is_alive():
            driver.join(10)
        sim_fleet.stop()


def first_version_everywhere(fleet: Fleet, version: dict[str, Any]) -> None:
    created = fleet.controller.cli(
        "rollouts", "create", "--model", "clf", "--version", version["version"], "--all"
    )
    done = wait_until(
        lambda: rollout_done(fleet.controller, created["id"]), 120, "the first version everywhere"
    )
    assert done["status"] == "succeeded", done
    fleet.wait_baseline(version["version"])
