"""Request and response bodies of /v1/rollouts: plans with waves and gates, progress, the event log."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import AwareDatetime, Field

from controller.api.bodies import Create, Public
from controller.registry import NAME_PATTERN
from controller.rollout_plans import FailureAction, Gates, Plan, ShadowGate, Target, Wave

STAGED_DEVICE_TIMEOUT_S = 900.0


class WaveIn(Create):
    count: int | None = Field(None, description="devices in this wave (or give percent)")
    percent: float | None = Field(None, description="percent of the target in this wave (or give count)")
    soak_s: float = Field(0.0, description="seconds the wave's gates are watched after its devices updated")


class GatesIn(Create):
    max_failure_fraction: float = 0.0
    max_error_rate: float | None = None
    max_latency_ratio: float | None = None
    min_reporting_fraction: float = 0.0
    min_inferences: int = 20
    min_confidence_ratio: float | None = None
    max_prediction_psi: float | None = None


class ShadowIn(Create):
    soak_s: float = Field(
        ..., description="seconds each wave's candidate runs in shadow before the gate is judged"
    )
    min_agreement: float | None = Field(
        None, description="top-1 agreement with the live model, weighted by samples compared"
    )
    max_deviation: float | None = Field(None, description="mean absolute deviation of the outputs, likewise")
    min_compared: int = Field(20, description="samples a device must compare to count towards the gate")


class TargetIn(Create):
    devices: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list, description="devices carrying every one of these tags")
    profile: str | None = None
    all: bool = False
    group: str | None = Field(
        default=None, description="the members of this device group (edgefleet groups list)"
    )


class RolloutSpec(Create):
    """How to roll a version out (without naming it): what a retraining policy keeps for the
    version its run registers."""

    tenant: str = "default"
    # A plain rollout's shorthand for target.devices.
    devices: list[str] = Field(default_factory=list)
    target: TargetIn | None = None
    waves: list[WaveIn] | None = Field(None, description="default: one wave of 100 %, no soak")
    gates: GatesIn | None = Field(
        None, description="default: none when no waves are given, else the strict defaults of GatesIn"
    )
    failure_action: Literal["pause", "rollback"] = "pause"
    manual_approval: bool = False
    device_timeout_s: float | None = Field(
        None, description=f"default: none without waves, else {STAGED_DEVICE_TIMEOUT_S:g} s"
    )
    max_concurrent: int = 0
    probation_s: float = 0.0
    probation_max_error_rate: float = 0.0
    shadow: ShadowIn | None = Field(
        None, description="a shadow phase per wave: the candidate beside the live model, gated on agreement"
    )

    def to_plan(self) -> Plan:
        t = self.target or TargetIn()
        target = Target(
            devices=tuple(dict.fromkeys([*t.devices, *self.devices])),
            tags=tuple(t.tags),
            profile=t.profile,
            all_devices=t.all,
            group=t.group,
        )
        plain = Plan(target)
        waves = tuple(Wave(w.count, w.percent, w.soak_s) for w in self.waves) if self.waves else plain.waves
        if self.gates is not None:
            gates = Gates(**self.gates.model_dump())
        else:
            gates = Gates() if self.waves else plain.gates
        staged = bool(self.waves) or self.shadow is not None
        return Plan(
            target=target,
            waves=waves,
            gates=gates,
            failure_action=FailureAction(self.failure_action),
            manual_approval=self.manual_approval,
            # A staged plan must not wait forever for a device that stays offline.
            device_timeout_s=self.device_timeout_s
            if self.device_timeout_s is not None or not staged
            else STAGED_DEVICE_TIMEOUT_S,
            max_concurrent=self.max_concurrent,
            probation_s=self.probation_s,
            probation_max_error_rate=self.probation_max_error_rate,
            shadow=ShadowGate(**self.shadow.model_dump()) if self.shadow is not None else None,
        )


class RolloutCreate(RolloutSpec):
    model: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    start_at: AwareDatetime | None = Field(
        None, description="ISO 8601 time with its UTC offset before which the first wave does not start"
    )

    def to_plan(self) -> Plan:
        plan = super().to_plan()
        if self.start_at is None:
            return plan
        return replace(plan, start_at=self.start_at.timestamp())


class RolloutCommandIn(Create):
    reason: str = ""


class RolloutDevicePublic(Public):
    device_id: str
    status: Literal[
        "waiting",
        "shadow",
        "pending",
        "downloading",
        "verifying",
        "loading",
        "probation",
        "active",
        "failed",
        "rolled_back",
        "skipped",
    ]
    detail: str
    updated_at: float
    wave: int


class RolloutPublic(Public):
    id: str
    model: str
    version: str
    tenant: str
    digest: str
    status: Literal["in_progress", "succeeded", "failed"]
    state: str
    wave: int
    waves: int
    reason: str
    created_at: float
    plan: dict[str, Any]
    devices: list[RolloutDevicePublic]


class RolloutEventPublic(Public):
    at: float
    kind: str
    wave: int
    device_id: str
    state: str
    reason: str
