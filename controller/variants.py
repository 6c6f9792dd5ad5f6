"""Which artifact variant a device gets: a pure function of the variants and the device's class.

:func:`choose` drops every variant the device cannot run, each with the reason
(not validated, runtime missing or too old, an ONNX IR version or opset its ONNX Runtime
cannot read, precision unsupported, too big for the model memory budget, input not fed by
the device's sensor), then ranks what is left: the profile's preferred precision first,
then int8 on CPU-only devices (fp16 on accelerated ones), then ONNX before TFLite (the
registry's primary format; TFLite variants serve devices without ONNX Runtime), then the
file as uploaded before its copy lowered to an older IR version (sent where only the copy
loads), then the smaller file. No I/O here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RUNTIME_FOR_FORMAT: Mapping[str, str] = {"onnx": "onnxruntime", "tflite": "litert"}
# Loaded weights plus the runtime's arena and activations: about twice the file.
MEMORY_FACTOR = 2
CPU_ORDER = ("int8", "fp16", "fp32")
ACCELERATED_ORDER = ("fp16", "fp32", "int8")
MB = 1024 * 1024


@dataclass(frozen=True)
class Candidate:
    variant: str
    format: str
    precision: str
    status: str
    size: int
    opset: int
    # Shape of the first input (-1 for a free dimension).
    input_shape: tuple[int, ...]
    reference: bool = False
    reason: str = ""
    # Oldest runtime release that runs it ("" = any).
    runtime_version: str = ""
    # The layout of the input the device's sensor feeds, from the version's signature ("" = unknown).
    input_layout: str = ""
    # ONNX: the IR version the file states (0 = unknown, not checked).
    ir_version: int = 0
    # A copy of another variant lowered to the IR version its content needs (controller.onnx_compat).
    lowered: bool = False


@dataclass(frozen=True)
class Sensor:
    id: str
    kind: str
    channels: int = 0


@dataclass(frozen=True)
class DeviceClass:
    profile_id: str
    runtimes: Mapping[str, str]
    precisions: tuple[str, ...]
    preferred_precision: str
    model_budget_bytes: int
    max_onnx_opset: int | None = None
    accelerated: bool = False
    sensors: tuple[Sensor, ...] = ()
    # The newest ONNX IR version its onnxruntime reads (None = unknown, not checked).
    max_onnx_ir: int | None = None


@dataclass(frozen=True)
class Choice:
    variant: str | None
    reason: str
    rejected: Mapping[str, str] = field(default_factory=dict)


def why_not(c: Candidate, device: DeviceClass, sensor_kind: str = "") -> str | None:
    """The first reason ``device`` cannot run ``c``, or None when it can."""
    if c.status != "ready":
        return f"not usable ({c.status}{': ' + c.reason if c.reason else ''})"
    runtime = RUNTIME_FOR_FORMAT.get(c.format)
    if runtime is None or runtime not in device.runtimes:
        have = ", ".join(sorted(device.runtimes)) or "none"
        return f"needs {runtime or c.format}, profile {device.profile_id} has {have}"
    minimum, installed = c.runtime_version, device.runtimes[runtime]
    if c.format == "onnx" and device.max_onnx_ir is not None and c.ir_version > device.max_onnx_ir:
        return (
            f"needs ONNX IR version {c.ir_version}, profile {device.profile_id}'s onnxruntime "
            f"{installed} reads up to {device.max_onnx_ir}"
        )
    if minimum and version_tuple(installed) < version_tuple(minimum):
        return f"needs {runtime} >= {minimum}, profile {device.profile_id} has {installed}"
    if c.format == "onnx":
        if device.max_onnx_opset is None:
            return f"profile {device.profile_id} declares no ONNX opset"
        if c.opset > device.max_onnx_opset:
            return f"needs ONNX opset {c.opset}, profile {device.profile_id} supports up to {device.max_onnx_opset}"
    if c.precision not in device.precisions:
        return f"precision {c.precision} is not supported by profile {device.profile_id} ({', '.join(device.precisions)})"
    need = c.size * MEMORY_FACTOR
    if need > device.model_budget_bytes:
        return (
            f"needs about {need / MB:.1f} MB to run, profile {device.profile_id} "
            f"budgets {device.model_budget_bytes / MB:.0f} MB for models"
        )
    if sensor_kind:
        return _sensor_problem(c.input_shape, device, sensor_kind, c.input_layout)
    return None


def version_tuple(text: str) -> tuple[int, ...]:
    """``"1.20.1"`` -> ``(1, 20, 1)``; digits after a non-digit (``"2.14rc1"``) are ignored."""
    parts = []
    for part in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _sensor_problem(shape: tuple[int, ...], device: DeviceClass, kind: str, layout: str = "") -> str | None:
    sensors = [s for s in device.sensors if s.kind == kind]
    if not sensors:
        return f"profile {device.profile_id} has no {kind}"
    if kind == "camera":
        # An image batch, channels first or last; the agent resizes frames to the model's size.
        if len(shape) != 4 or not any(shape[axis] in (-1, 1, 3) for axis in (1, 3)):
            return f"input shape {list(shape)} is not an image batch (N, C, H, W) or (N, H, W, C)"
        return None
    if not shape:
        return f"input shape {list(shape)} has no channel axis for a {kind}"
    if kind == "microphone" and (layout == "NT" or (not layout and len(shape) == 2)):
        # (batch, samples): mono audio, which the agent mixes any microphone down to.
        return None
    channels = shape[1] if kind == "microphone" and len(shape) == 3 and layout != "NTC" else shape[-1]
    if channels == -1 or any(channels == s.channels for s in sensors):
        return None
    have = ", ".join(f"{s.id}: {s.channels}" for s in sensors)
    return f"input wants {channels} channels, the profile's {kind} gives {have}"


def choose(candidates: Sequence[Candidate], device: DeviceClass | None, sensor_kind: str = "") -> Choice:
    if device is None:
        reference = next((c for c in candidates if c.reference and c.status == "ready"), None)
        if reference is None:
            return Choice(None, "the device has no profile and the version has no ready uploaded variant")
        return Choice(reference.variant, "the device has no profile: sent the uploaded variant")
    rejected: dict[str, str] = {}
    usable: list[Candidate] = []
    for c in candidates:
        problem = why_not(c, device, sensor_kind)
        if problem is None:
            usable.append(c)
        else:
            rejected[c.variant] = problem
    if not usable:
        detail = "; ".join(f"{v}: {r}" for v, r in sorted(rejected.items())) or "the version has no variants"
        return Choice(None, f"no variant fits profile {device.profile_id}: {detail}", rejected)
    order = ACCELERATED_ORDER if device.accelerated else CPU_ORDER

    def rank(c: Candidate) -> tuple[bool, int, bool, bool, int, str]:
        fallback = order.index(c.precision) if c.precision in order else len(order)
        return (
            c.precision != device.preferred_precision,
            fallback,
            c.format != "onnx",
            c.lowered,
            c.size,
            c.variant,
        )

    best = min(usable, key=rank)
    why = (
        "preferred precision" if best.precision == device.preferred_precision else "best available precision"
    )
    return Choice(best.variant, f"{why} {best.precision} for profile {device.profile_id}", rejected)
