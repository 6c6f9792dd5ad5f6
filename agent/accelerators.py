"""The accelerator the device's profile declares, used when the installed runtime offers it.

A profile's ``[[accelerators]]`` names the runtime that drives it (``firmware_profiles/``:
``onnxruntime-tensorrt`` on a Jetson, ``litert-edgetpu`` on a Coral, ``litert-vx-delegate``
on an i.MX 8M Plus); provisioning writes it into agent.toml as ``[accelerator] runtime``.
For ONNX Runtime an accelerator is execution providers tried in order before the CPU; for
LiteRT it is a delegate library. Whether it can be used is the runtime's to say: its list
of available providers (onnxruntime-gpu offers CUDA and TensorRT, the plain wheel does not),
the delegate library loading, and last the session's own providers, since onnxruntime falls
back to the CPU on its own when CUDA, cuDNN or TensorRT libraries are missing.

When it cannot be used the model runs on the CPU all the same and the device reports the
``accelerator_unavailable`` condition saying why, so an operator sees a Jetson serving
from its CPU without reading its log. This module decides; :mod:`agent.runtime` asks the
runtimes (no other agent module imports one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.conditions import ACCELERATOR_UNAVAILABLE, Conditions

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

# A profile's accelerator runtime -> the execution providers that drive it, best first.
# TensorRT hands the nodes it cannot build to CUDA, as onnxruntime's documentation advises.
ONNX_PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "onnxruntime-cuda": ("CUDAExecutionProvider",),
    "onnxruntime-openvino": ("OpenVINOExecutionProvider",),
}
# A profile's accelerator runtime -> the LiteRT delegate library its vendor installs.
LITERT_DELEGATES: dict[str, str] = {
    "litert-edgetpu": "libedgetpu.so.1",
    "litert-vx-delegate": "/usr/lib/libvx_delegate.so",
}
# Built TensorRT engines are kept here (under the data folder, which the unit lets the agent
# write): building one for a model takes minutes on a Jetson, loading it a second.
ENGINE_CACHE_DIR = "accelerator-cache"

Provider = str | tuple[str, dict[str, str]]


@dataclass(frozen=True)
class OnnxPlan:
    """The providers a session is asked for, and why the accelerator is left out, if it is."""

    providers: tuple[Provider, ...]
    # The accelerator's providers this runtime offers, best first; empty: the CPU only.
    accelerated: tuple[str, ...]
    problem: str = ""


def onnx_plan(runtime: str, available: Sequence[str], cache_dir: Path | None = None) -> OnnxPlan:
    """Which providers to ask onnxruntime for, given those it says it has. Pure."""
    wanted = ONNX_PROVIDERS.get(runtime, ())
    offered = tuple(p for p in wanted if p in available)
    problem = ""
    if not wanted:
        problem = (
            f"this agent does not drive {runtime!r} with onnxruntime (it knows {', '.join(ONNX_PROVIDERS)})"
        )
    elif not offered or offered[0] != wanted[0]:
        problem = (
            f"{wanted[0]} is not among this onnxruntime's providers ({', '.join(available) or 'none'}); "
            "install onnxruntime-gpu built for this device's CUDA"
        )
    providers: list[Provider] = []
    for name in offered:
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)}
            providers.append((name, options))
        else:
            providers.append(name)
    return OnnxPlan((*providers, CPU_PROVIDER), offered, problem)


def session_problem(plan: OnnxPlan, used: Sequence[str]) -> str:
    """Why the session did not take the accelerator it was asked for ("" when it did). Pure."""
    if plan.accelerated and plan.accelerated[0] not in used:
        return (
            f"onnxruntime offers {plan.accelerated[0]} but the session fell back to {', '.join(used)} "
            "(its CUDA, cuDNN or TensorRT libraries are missing or do not match; see the agent's log)"
        )
    return ""


def delegate_library(runtime: str, override: str = "") -> str:
    """The LiteRT delegate library for the runtime ("" when this agent does not know one). Pure."""
    return override or LITERT_DELEGATES.get(runtime, "")


def backend_of(runtime: str) -> str:
    """The agent backend an accelerator runtime belongs to: ``onnxruntime``, ``litert`` or ""."""
    for backend in ("onnxruntime", "litert"):
        if runtime == backend or runtime.startswith(backend + "-"):
            return backend
    return ""


class Accelerator:
    """The declared accelerator of this device and the condition it reports while unusable."""

    def __init__(
        self,
        runtime: str,
        conditions: Conditions,
        data_dir: Path | None = None,
        delegate_library: str = "",
    ) -> None:
        self.runtime = runtime
        self.conditions = conditions
        self.cache_dir = data_dir / ENGINE_CACHE_DIR if data_dir is not None else None
        self.delegate_override = delegate_library
        self._used = False

    @property
    def declared(self) -> bool:
        return bool(self.runtime)

    def drives(self, backend: str) -> bool:
        return backend_of(self.runtime) == backend

    def plan(self, available: Sequence[str]) -> OnnxPlan:
        plan = onnx_plan(self.runtime, available, self.cache_dir)
        if plan.problem:
            self.unavailable(plan.problem)
        elif self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        return plan

    def session_used(self, plan: OnnxPlan, used: Sequence[str]) -> None:
        problem = session_problem(plan, used)
        if problem:
            self.unavailable(problem)
        elif plan.accelerated:
            self.in_use(plan.accelerated[0])

    def delegate(self) -> str:
        library = delegate_library(self.runtime, self.delegate_override)
        if not library:
            self.unavailable(
                f"this agent knows no LiteRT delegate for {self.runtime!r} "
                f"(it knows {', '.join(LITERT_DELEGATES)}); set [accelerator] delegate_library"
            )
        return library

    def unknown_backend(self) -> None:
        self.unavailable(
            f"no runtime of this agent drives {self.runtime!r} "
            f"(known: {', '.join([*ONNX_PROVIDERS, *LITERT_DELEGATES])})"
        )

    def unavailable(self, why: str) -> None:
        message = f"accelerator unavailable: {self.runtime}: {why}; models run on the CPU"
        if self.conditions.hit(ACCELERATOR_UNAVAILABLE, message):
            log.warning("%s", message)

    def in_use(self, what: str) -> None:
        cleared = self.conditions.clear(ACCELERATOR_UNAVAILABLE) is not None
        if cleared or not self._used:
            log.info("accelerator in use runtime=%s by=%s", self.runtime, what)
        self._used = True
