"""Constants and state carried from an output to an input, per tenant and source epoch."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import TenantError
from agent.feeds import Feeder, check, source_input
from agent.tenants import from_proto, parse_tenant

VAD = {
    "id": "vad",
    "inputs": {
        "sr": {"role": "constant", "value": 16000, "dtype": "int64"},
        "state": {"role": "state", "from": "stateN", "shape": [2, 1, 128]},
    },
}


def counting_model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"output": inputs["input"].sum(keepdims=True), "stateN": inputs["state"] + 1}


def test_state_is_carried_between_runs_and_reset_by_a_new_source_epoch() -> None:
    spec = parse_tenant(VAD)
    feeder = Feeder(spec.inputs)
    seen: list[float] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert inputs["sr"].dtype == np.int64 and int(inputs["sr"]) == 16000
        seen.append(float(inputs["state"][0, 0, 0]))
        return counting_model(inputs)

    x = np.zeros((1, 576), np.float32)
    for _ in range(3):
        feeder.run("input", x, 0, model)
    feeder.run("input", x, 1, model)
    assert seen == [0.0, 1.0, 2.0, 0.0]


def test_a_failed_run_leaves_the_state_as_it_was() -> None:
    feeder = Feeder(parse_tenant(VAD).inputs)
    x = np.zeros((1, 4), np.float32)
    feeder.run("input", x, 0, counting_model)

    def failing(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        feeder.run("input", x, 0, failing)
    out = feeder.run("input", x, 0, counting_model)
    assert float(out["stateN"][0, 0, 0]) == 2.0


def test_check_names_inputs_nothing_feeds_and_unknown_outputs() -> None:
    feeds = parse_tenant(VAD).inputs
    assert source_input(feeds, ["input", "state", "sr"], "") == "input"
    assert check(feeds, ["input", "state", "sr"], ["output", "stateN"], "input") == []
    problems = check(feeds, ["input", "state", "sr", "h"], ["output"], "input")
    assert "inputs.state.from: the model has no output 'stateN' (it has ['output'])" in problems
    assert "inputs ['h'] are fed by nothing: declare them as constant or state" in problems


def test_bad_feed_declarations_are_refused_naming_the_key() -> None:
    with pytest.raises(TenantError, match=r"inputs.state.from"):
        parse_tenant({"id": "t", "inputs": {"state": {"role": "state"}}})
    with pytest.raises(TenantError, match=r"3 values do not fill shape \[2\]"):
        parse_tenant({"id": "t", "inputs": {"c": {"role": "constant", "value": [1, 2, 3], "shape": [2]}}})
    with pytest.raises(TenantError, match=r"inputs.c.role"):
        parse_tenant({"id": "t", "inputs": {"c": {"role": "secret"}}})


def test_feeds_and_postprocess_travel_in_the_desired_state() -> None:
    from edgefleet_proto import fleet_pb2

    msg = fleet_pb2.TenantSpec(tenant="vad", postprocess={"kind": "threshold", "threshold": "0.6"})
    msg.inputs.add(name="sr", role="constant", value=[16000], dtype="int64")
    msg.inputs.add(name="state", role="state", value=[0], shape=[2, 1, 128], from_output="stateN")
    spec = from_proto(msg)
    assert spec.postprocess.kind == "threshold" and spec.postprocess.threshold == 0.6
    assert [(f.name, f.role, f.shape) for f in spec.inputs] == [
        ("sr", "constant", ()),
        ("state", "state", (2, 1, 128)),
    ]
