"""The variant choice is a pure function: a table of devices and variants, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.variants import MB, Candidate, DeviceClass, Sensor, choose, why_not

FP32 = Candidate("onnx-fp32", "onnx", "fp32", "ready", 4 * MB, 17, (-1, 3, 32, 32), reference=True)
INT8 = Candidate("onnx-int8-static", "onnx", "int8", "ready", 1 * MB, 17, (-1, 3, 32, 32))
TFL8 = Candidate("tflite-int8", "tflite", "int8", "ready", 1 * MB, 0, (-1, 32, 32, 3))
ALL = [FP32, INT8, TFL8]

PI_ZERO = DeviceClass(
    "pi-zero", {"onnxruntime": "1.20.1", "litert": "1.2.0"}, ("fp32", "int8"), "int8", 96 * MB, 21,
    sensors=(Sensor("cam0", "camera", 3),),
)  # fmt: skip
JETSON = DeviceClass(
    "jetson", {"onnxruntime": "1.20.1"}, ("fp32", "fp16", "int8"), "fp16", 4096 * MB, 21, accelerated=True
)
CORAL = DeviceClass("coral", {"litert": "1.2.0"}, ("fp32", "int8"), "int8", 256 * MB, None, accelerated=True)


@pytest.mark.parametrize(
    ("device", "candidates", "chosen"),
    [
        (PI_ZERO, ALL, "onnx-int8-static"),  # preferred precision
        (PI_ZERO, [FP32, INT8, replace(TFL8, size=MB // 2)], "onnx-int8-static"),  # ONNX before TFLite
        (
            PI_ZERO,
            [FP32, replace(INT8, size=2 * MB), replace(INT8, variant="onnx-int8-dynamic")],
            "onnx-int8-dynamic",
        ),
        (JETSON, ALL, "onnx-fp32"),  # no fp16 variant: fp32 is next on an accelerated device
        (CORAL, ALL, "tflite-int8"),  # no onnxruntime
        (replace(JETSON, accelerated=False, preferred_precision="fp16"), ALL, "onnx-int8-static"),
        (PI_ZERO, [FP32, replace(INT8, status="rejected", reason="top-1 agreement 90%")], "onnx-fp32"),
    ],
)
def test_best_variant_per_device_class(device: DeviceClass, candidates: list[Candidate], chosen: str) -> None:
    assert choose(candidates, device).variant == chosen


def test_every_refusal_names_its_reason() -> None:
    assert "not usable (rejected: top-1 agreement 90%)" in str(
        why_not(replace(INT8, status="rejected", reason="top-1 agreement 90%"), PI_ZERO)
    )
    assert why_not(FP32, CORAL) == "needs onnxruntime, profile coral has litert"
    assert (
        why_not(replace(FP32, opset=22), PI_ZERO) == "needs ONNX opset 22, profile pi-zero supports up to 21"
    )
    assert "precision int8 is not supported" in str(why_not(INT8, replace(PI_ZERO, precisions=("fp32",))))
    assert "needs about 100.0 MB to run, profile pi-zero budgets 96 MB" in str(
        why_not(replace(FP32, size=50 * MB), PI_ZERO)
    )
    assert why_not(FP32, PI_ZERO, "microphone") == "profile pi-zero has no microphone"
    assert "not an image batch" in str(why_not(replace(FP32, input_shape=(-1, 64)), PI_ZERO, "camera"))
    assert why_not(TFL8, PI_ZERO, "camera") is None  # channels last is an image too
    pending = replace(INT8, status="pending")
    assert why_not(pending, PI_ZERO) == "not usable (pending)"


def test_sensor_channels_must_match() -> None:
    mic = replace(PI_ZERO, sensors=(Sensor("mic0", "microphone", 1),))
    audio = replace(FP32, input_shape=(-1, 2, 16000))
    assert (
        why_not(audio, mic, "microphone") == "input wants 2 channels, the profile's microphone gives mic0: 1"
    )
    assert why_not(replace(audio, input_shape=(-1, 1, 16000)), mic, "microphone") is None
    assert why_not(replace(audio, input_shape=(-1, -1, 16000)), mic, "microphone") is None


def test_no_compatible_variant_means_nothing_is_sent_and_says_why() -> None:
    choice = choose([FP32, INT8], CORAL)
    assert choice.variant is None
    assert choice.reason.startswith("no variant fits profile coral: ")
    assert set(choice.rejected) == {"onnx-fp32", "onnx-int8-static"}
    assert choose([], CORAL).reason == "no variant fits profile coral: the version has no variants"


def test_a_device_without_a_profile_gets_the_uploaded_variant() -> None:
    choice = choose(ALL, None)
    assert choice.variant == "onnx-fp32" and "no profile" in choice.reason
    assert choose([INT8], None).variant is None


def test_choice_does_not_depend_on_the_order_of_the_variants() -> None:
    assert {choose(order, PI_ZERO).variant for order in (ALL, ALL[::-1], [TFL8, FP32, INT8])} == {
        "onnx-int8-static"
    }


def test_a_runtime_older_than_the_variant_needs_is_refused() -> None:
    old = replace(PI_ZERO, runtimes={"onnxruntime": "1.16.3"})
    assert (
        why_not(replace(FP32, runtime_version="1.18"), old)
        == "needs onnxruntime >= 1.18, profile pi-zero has 1.16.3"
    )
    assert why_not(replace(FP32, runtime_version="1.16"), old) is None
    assert (
        why_not(replace(TFL8, runtime_version=""), replace(PI_ZERO, runtimes={"litert": "2.14rc1"})) is None
    )


def test_an_onnx_ir_version_the_profiles_onnxruntime_cannot_read_is_refused_and_its_lowered_copy_sent() -> (
    None
):
    written = replace(FP32, ir_version=14)  # what onnx 1.23 writes, whatever the opset
    lowered = replace(FP32, variant="onnx-fp32-ir8", reference=False, ir_version=8, lowered=True)
    pi = replace(PI_ZERO, max_onnx_ir=10)  # onnxruntime 1.20.1
    assert (
        why_not(written, pi)
        == "needs ONNX IR version 14, profile pi-zero's onnxruntime 1.20.1 reads up to 10"
    )
    choice = choose([written, lowered], pi)
    assert choice.variant == "onnx-fp32-ir8"
    assert choice.rejected == {
        "onnx-fp32": "needs ONNX IR version 14, profile pi-zero's onnxruntime 1.20.1 reads up to 10"
    }
    # Where the original loads, the original is sent, not its copy.
    newer = replace(pi, runtimes={"onnxruntime": "1.32.0"}, max_onnx_ir=14)
    assert choose([lowered, written], newer).variant == "onnx-fp32"
    # A file that cannot be lowered far enough is refused with the reason, nothing sent.
    assert choose([replace(written, ir_version=11)], pi).reason.endswith("reads up to 10")
