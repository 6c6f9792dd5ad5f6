"""A microphone feeds audio samples: a (batch, samples) input is mono audio, not channels."""

from __future__ import annotations

from dataclasses import replace

from controller.inspection import TensorSpec
from controller.profiles import candidates
from controller.registry import ModelVersion, Variant
from controller.signature import InputRole, ModelSignature
from controller.variants import MB, Candidate, DeviceClass, Sensor, why_not

MIC = DeviceClass(
    "pi-4",
    {"onnxruntime": "1.20.1"},
    ("fp32", "int8"),
    "int8",
    512 * MB,
    21,
    sensors=(Sensor("mic0", "microphone", 1),),
)
# silero-vad as its samples shape it: one window of 576 samples (512 new, 64 of context).
SILERO = Candidate("onnx-fp32", "onnx", "fp32", "ready", 2 * MB, 16, (1, 576), reference=True)


def test_a_batch_of_audio_samples_is_fed_by_any_microphone() -> None:
    assert why_not(SILERO, MIC, "microphone") is None
    assert why_not(replace(SILERO, input_layout="NT"), MIC, "microphone") is None
    stereo = replace(MIC, sensors=(Sensor("mic0", "microphone", 2),))
    assert why_not(SILERO, stereo, "microphone") is None  # the agent mixes channels down to mono


def test_time_steps_of_channels_still_need_that_many_microphone_channels() -> None:
    two = replace(SILERO, input_shape=(1, 16000, 2), input_layout="NTC")
    assert why_not(two, MIC, "microphone") == "input wants 2 channels, the profile's microphone gives mic0: 1"
    # Without a layout a 3-D audio input is read channels first, as before.
    assert "wants 2 channels" in str(why_not(replace(SILERO, input_shape=(-1, 2, 16000)), MIC, "microphone"))


def test_a_sensor_row_is_still_read_as_features() -> None:
    rows = replace(MIC, sensors=(Sensor("imu", "sensor", 6),))
    assert why_not(replace(SILERO, input_shape=(-1, 6)), rows, "sensor") is None
    assert "wants 576 channels" in str(why_not(SILERO, rows, "sensor"))


def test_the_candidates_read_the_signatures_source_input() -> None:
    spec = [TensorSpec("state", "float32", [2, -1, 128]), TensorSpec("input", "float32", [1, 576])]
    variant = Variant(
        "silero", "1", "onnx-fp32", "onnx", "fp32", "uploaded", "ready", 1.0, "d" * 64, 2 * MB, spec, [], 16,
        "onnxruntime", "", None, {}, "", "", "", 0.0, 0.0,
    )  # fmt: skip
    signature = ModelSignature(
        [
            InputRole("state", "state", "float32", [2, -1, 128], batch_axis=1, from_output="stateN"),
            InputRole("input", "source", "float32", [1, 576], layout="NT", batch_axis=0),
        ],
        [],
    )
    version = ModelVersion(
        "silero", "1", "d" * 64, 2 * MB, "onnx", spec, [], {}, 0.0, variants=[variant], signature=signature
    )
    (candidate,) = candidates(version)
    assert (candidate.input_shape, candidate.input_layout) == ((1, 576), "NT")
    assert why_not(candidate, MIC, "microphone") is None
