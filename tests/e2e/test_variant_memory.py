"""Variant production and drift baselines cannot blow the controller's memory: a real controller
process, a hostile model that passes the upload checks (it runs on the first sample of its
calibration set, zeros) but asks for hundreds of MiB on every other sample; quantizing and
validating it, and its predictions on the calibration set for the drift baseline, run in
memory-limited child processes, so the variants fail with the reason, the baseline goes without
predictions, and the controller's own peak memory does not move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.support.localfleet import Controller
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

MIB = 1 << 20


def value_hungry_model(path: Path, n_in: int = 4) -> Path:
    """y = x + sum(ConstantOfShape([max(x) MiB of float32 ones])): harmless on zeros, and on
    a sample whose largest value is 600 it fills 600 MiB; no shape inference can size it."""
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
            helper.make_node("Cast", ["peak"], ["peak_int"], to=TensorProto.INT64),
            helper.make_node("Mul", ["peak_int", "per_unit"], ["count"]),
            helper.make_node("Reshape", ["count", "one_dim"], ["count_1d"]),
            helper.make_node("ConstantOfShape", ["count_1d"], ["big"], value=ones),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        "value_hungry",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_in])],
        [
            numpy_helper.from_array(np.array(MIB // 4, np.int64), "per_unit"),
            numpy_helper.from_array(np.array([1], np.int64), "one_dim"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def peak_rss(controller: Controller) -> int:
    """The controller process's peak resident memory (VmHWM), in bytes."""
    assert controller.proc is not None
    for line in Path(f"/proc/{controller.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def settled(controller: Controller) -> dict[str, Any] | None:
    shown: dict[str, Any] = controller.cli("models", "show", "hungry", "1")
    return shown if all(v["status"] not in ("pending", "running") for v in shown["variants"]) else None


def test_a_model_that_expands_on_its_calibration_set_fails_its_variants_without_growing_the_controller(
    controller: Controller, tmp_path: Path
) -> None:
    # What one model may take in memory; variant production gets a few times that.
    controller.stop()
    settings = controller.data_dir / "controller.toml"
    lines = [ln for ln in settings.read_text().splitlines() if not ln.startswith("max_model_memory_bytes")]
    settings.write_text("\n".join([*lines, f"max_model_memory_bytes = {64 * MIB}", ""]))
    controller.start()

    model = value_hungry_model(tmp_path / "hungry.onnx")
    calibration = np.full((12, 4), 600.0, np.float32)
    calibration[0] = 0.0  # the sample the upload check runs
    np.savez(tmp_path / "calibration.npz", x=calibration)
    before = peak_rss(controller)
    created = controller.cli(
        "models", "upload", str(model), "--name", "hungry", "--version", "1",
        "--calibration", str(tmp_path / "calibration.npz"), "--dynamic",
    )  # fmt: skip
    assert {v["variant"] for v in created["variants"]} >= {"onnx-int8-static", "onnx-int8-dynamic"}

    shown = wait_until(lambda: settled(controller), 300, "the variants to settle")
    # The calibration set is also the version's drift baseline, with the model's own
    # predictions on it (the maintenance thread runs the model for them).
    baseline = "/v1/models/hungry/versions/1/drift/baseline"
    wait_until(lambda: controller.api("GET", baseline).status_code == 200, 120, "the drift baseline")
    grown = peak_rss(controller) - before
    assert grown < 200 * MIB, f"the controller's peak memory grew by {grown / MIB:.0f} MiB"
    produced = {v["variant"]: v for v in shown["variants"] if v["variant"] != "onnx-fp32"}
    for name, v in produced.items():
        assert v["status"] == "failed", (name, v)
        assert "memory" in v["reason"], (name, v["reason"])
    assert controller.api("GET", "/v1/models").status_code == 200, "the controller still answers"
