"""The profile's accelerator: chosen from the providers the runtime offers, else the CPU with a
condition. The runtime's list of providers is the one seam; sessions and models are real."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.accelerators import Accelerator, onnx_plan, session_problem
from agent.conditions import ACCELERATOR_UNAVAILABLE, Conditions
from agent.config import parse_config
from agent.errors import ConfigError
from agent.runtime import LiteRtBackend, OnnxRuntimeBackend, backend_for, probe_accelerator
from tests.support.delegates import compiler, null_delegate, prepared
from tests.support.model_bytes import linear_model, write_model
from tests.support.models import sine_float_tflite

# What onnxruntime-gpu lists on a Jetson, what the plain wheel lists, and a CUDA-only build.
GPU_WHEEL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_WHEEL = ["AzureExecutionProvider", "CPUExecutionProvider"]
CUDA_ONLY = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def names(providers: Sequence[object]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]  # type: ignore[index]


@pytest.mark.parametrize(
    ("runtime", "available", "expected", "problem"),
    [
        (
            "onnxruntime-tensorrt",
            GPU_WHEEL,
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            "",
        ),
        ("onnxruntime-cuda", GPU_WHEEL, ["CUDAExecutionProvider", "CPUExecutionProvider"], ""),
        (
            "onnxruntime-tensorrt",
            CUDA_ONLY,
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "TensorrtExecutionProvider is not among this onnxruntime's providers",
        ),
        (
            "onnxruntime-tensorrt",
            CPU_WHEEL,
            ["CPUExecutionProvider"],
            "TensorrtExecutionProvider is not among this onnxruntime's providers "
            "(AzureExecutionProvider, CPUExecutionProvider)",
        ),
        ("onnxruntime-hailo", GPU_WHEEL, ["CPUExecutionProvider"], "does not drive 'onnxruntime-hailo'"),
    ],
)
def test_the_providers_asked_for_are_those_the_runtime_offers_best_first(
    runtime: str, available: list[str], expected: list[str], problem: str
) -> None:
    plan = onnx_plan(runtime, available, Path("/var/lib/edgefleet-agent/accelerator-cache"))
    assert names(plan.providers) == expected
    assert (problem in plan.problem) if problem else plan.problem == ""


def test_tensorrt_keeps_its_built_engines_in_the_data_folder() -> None:
    plan = onnx_plan("onnxruntime-tensorrt", GPU_WHEEL, Path("/data/accelerator-cache"))
    assert plan.providers[0] == (
        "TensorrtExecutionProvider",
        {"trt_engine_cache_enable": "True", "trt_engine_cache_path": "/data/accelerator-cache"},
    )


def test_a_session_that_fell_back_is_a_problem_and_one_that_took_it_is_not() -> None:
    plan = onnx_plan("onnxruntime-cuda", GPU_WHEEL)
    assert session_problem(plan, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ""
    assert "fell back to CPUExecutionProvider" in session_problem(plan, ["CPUExecutionProvider"])


def held(conditions: Conditions) -> str:
    found = [c.message for c in conditions.active() if c.kind == ACCELERATOR_UNAVAILABLE]
    return found[0] if found else ""


# onnxruntime warns that it lacks the providers the seam said it had: that is the point.
@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_runtime_that_offers_the_provider_but_cannot_use_it_serves_on_the_cpu_and_says_so(
    tmp_path: Path,
) -> None:
    """onnxruntime-gpu on a device without CUDA's libraries lists CUDA and then falls back: the
    runtime's list says yes (the seam), the real session says no."""
    model = tmp_path / "m.onnx"
    write_model(model, linear_model(3, 8, 2))
    conditions = Conditions()
    accelerator = Accelerator("onnxruntime-tensorrt", conditions, tmp_path / "data")
    backend = OnnxRuntimeBackend(threads=1, accelerator=accelerator, available_providers=lambda: GPU_WHEEL)
    loaded = backend.load(model)

    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(loaded.run({"x": x})["y"], expected)
    message = held(conditions)
    assert message.startswith("accelerator unavailable: onnxruntime-tensorrt: ")
    assert "offers TensorrtExecutionProvider but the session fell back to CPUExecutionProvider" in message
    assert message.endswith("models run on the CPU")


def test_the_installed_cpu_wheel_is_said_to_lack_the_accelerator(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    write_model(model, linear_model(4, 8, 2))
    conditions = Conditions()
    accelerator = Accelerator("onnxruntime-cuda", conditions)
    loaded = backend_for("onnxruntime", "onnx", 1, accelerator).load(model)
    assert [s.name for s in loaded.outputs] == ["y"]
    available = ", ".join(ort.get_available_providers())
    assert held(conditions) == (
        "accelerator unavailable: onnxruntime-cuda: CUDAExecutionProvider is not among this "
        f"onnxruntime's providers ({available}); install onnxruntime-gpu built for this device's CUDA; "
        "models run on the CPU"
    )


def test_an_accelerator_for_the_other_runtime_leaves_a_model_alone(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    write_model(model, linear_model(5, 8, 2))
    conditions = Conditions()
    OnnxRuntimeBackend(accelerator=Accelerator("litert-edgetpu", conditions)).load(model)
    assert conditions.active() == ()


def test_an_edge_tpu_delegate_that_does_not_load_leaves_the_model_on_the_cpu() -> None:
    conditions = Conditions()
    backend = LiteRtBackend(threads=1, accelerator=Accelerator("litert-edgetpu", conditions))
    model = backend.load(sine_float_tflite())
    x = np.array([[0.5]], dtype=np.float32)
    y = model.run({model.inputs[0].name: x})[model.outputs[0].name]
    assert abs(float(y[0, 0]) - np.sin(0.5)) < 0.2
    assert held(conditions).startswith(
        "accelerator unavailable: litert-edgetpu: its LiteRT delegate libedgetpu.so.1 does not load: "
    )


@pytest.mark.skipif(compiler() is None, reason="builds a LiteRT delegate with the C compiler")
def test_a_delegate_that_loads_runs_the_model_and_ends_the_condition(tmp_path: Path) -> None:
    library = null_delegate(tmp_path)
    conditions = Conditions()
    accelerator = Accelerator("litert-vx-delegate", conditions, delegate_library=str(library))
    accelerator.unavailable("the NPU was busy")  # as a load before this one found it
    model = LiteRtBackend(threads=1, accelerator=accelerator).load(sine_float_tflite())
    y = model.run({model.inputs[0].name: np.array([[0.5]], dtype=np.float32)})[model.outputs[0].name]
    assert abs(float(y[0, 0]) - np.sin(0.5)) < 0.2
    assert prepared(library) == 1
    assert conditions.active() == ()


def test_the_condition_is_reported_at_start_before_any_model_loads() -> None:
    conditions = Conditions()
    probe_accelerator(Accelerator("onnxruntime-tensorrt", conditions))
    assert "TensorrtExecutionProvider is not among" in held(conditions)
    unknown = Conditions()
    probe_accelerator(Accelerator("hailort", unknown))
    assert "no runtime of this agent drives 'hailort'" in held(unknown)
    none = Conditions()
    probe_accelerator(Accelerator("", none))
    assert none.active() == ()


BASE = """
device_id = "cam-1"
data_dir = "/tmp/x"
[mqtt]
password = "p"
[security]
allow_unsigned = true
"""


def test_agent_toml_carries_the_profiles_accelerator() -> None:
    config = parse_config(BASE + '[accelerator]\nruntime = "onnxruntime-tensorrt"\n')
    assert config.accelerator.runtime == "onnxruntime-tensorrt"
    assert parse_config(BASE).accelerator.runtime == ""
    with pytest.raises(ConfigError, match=r"accelerator\.provider: unknown key"):
        parse_config(BASE + '[accelerator]\nprovider = "cuda"\n')
