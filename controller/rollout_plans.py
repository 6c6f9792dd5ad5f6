"""Rollout plans: which devices, in which waves, judged by which gates.

A plan is data the operator writes (REST body or CLI flags) and the engine
reads; it never changes after the rollout is created. Validation lives here so
a bad plan is refused with a message naming the field before anything is
stored. Pure code: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from controller.errors import InvalidInputError

MAX_WAVES = 20


class FailureAction(StrEnum):
    PAUSE = "pause"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Wave:
    """One wave: ``count`` devices or ``percent`` of the target (exactly one), then ``soak_s`` seconds."""

    count: int | None = None
    percent: float | None = None
    soak_s: float = 0.0


@dataclass(frozen=True)
class Gates:
    """Thresholds judged over each wave's devices; ``None`` leaves a gate out."""

    # Fraction of the wave's devices whose update failed (or did not finish in time while online).
    max_failure_fraction: float = 0.0
    # Errors / inferences of the new version on the wave's devices.
    max_error_rate: float | None = None
    # Median over the wave's devices of p95(new version) / p95(previous version before the wave).
    max_latency_ratio: float | None = None
    # Fraction of the wave's devices that must have reported an outcome by the end of the soak.
    min_reporting_fraction: float = 0.0
    # Inferences of the new version a device needs before its error rate and latency count.
    min_inferences: int = 20
    # Mean top-class confidence of the new version / the previous version's on the same devices
    # (from the drift sketches in telemetry, when the devices send them).
    min_confidence_ratio: float | None = None
    # Population stability index of the predicted-class distribution, new version against the
    # previous one on the same devices (drift sketches again).
    max_prediction_psi: float | None = None


@dataclass(frozen=True)
class ShadowGate:
    """Before a wave goes live its devices run the candidate as ``{tenant}.shadow`` beside the live
    model for ``soak_s``; the wave goes live only if the candidate agreed with the live model."""

    soak_s: float = 0.0
    # Top-1 agreement with the live model, mean over the wave's devices weighted by compared samples.
    min_agreement: float | None = None
    # Mean absolute deviation of the outputs, weighted likewise (for models that are not classifiers).
    max_deviation: float | None = None
    # Compared samples a device needs to count; devices with fewer count against the reporting gate.
    min_compared: int = 20


@dataclass(frozen=True)
class Target:
    """Devices matching every given criterion; ``all_devices`` alone means the whole fleet."""

    devices: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    profile: str | None = None
    all_devices: bool = False
    # A device group (controller.groups), its members as they are when the rollout is created.
    group: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.devices or self.tags or self.profile or self.all_devices or self.group)


@dataclass(frozen=True)
class Plan:
    target: Target
    waves: tuple[Wave, ...] = (Wave(percent=100.0),)
    gates: Gates = field(default_factory=lambda: Gates(max_failure_fraction=1.0, min_inferences=1))
    failure_action: FailureAction = FailureAction.PAUSE
    manual_approval: bool = False
    # Seconds a device has from receiving the desired state to reporting an outcome; None waits forever.
    device_timeout_s: float | None = None
    # Devices of a wave updating at the same time; 0 means no limit.
    max_concurrent: int = 0
    # Sent to the agent: its own probation before it commits the new model.
    probation_s: float = 0.0
    probation_max_error_rate: float = 0.0
    # A shadow phase before each wave goes live; None: waves go live at once.
    shadow: ShadowGate | None = None
    # Epoch seconds before which the first wave does not start; None: at once.
    start_at: float | None = None

    @property
    def staged(self) -> bool:
        """Anything beyond a plain rollout's "send it to these devices now"."""
        return (
            len(self.waves) > 1
            or any(w.soak_s for w in self.waves)
            or self.gates != Plan(self.target).gates
            or self.manual_approval
            or self.failure_action is not FailureAction.PAUSE
            or self.shadow is not None
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Plan:
        t = doc["target"]
        return cls(
            target=Target(
                tuple(t["devices"]), tuple(t["tags"]), t["profile"], bool(t["all_devices"]), t.get("group")
            ),
            waves=tuple(Wave(**w) for w in doc["waves"]),
            gates=Gates(**doc["gates"]),
            failure_action=FailureAction(doc["failure_action"]),
            manual_approval=bool(doc["manual_approval"]),
            device_timeout_s=doc["device_timeout_s"],
            max_concurrent=int(doc["max_concurrent"]),
            probation_s=float(doc["probation_s"]),
            probation_max_error_rate=float(doc["probation_max_error_rate"]),
            # Plans stored before shadow gates existed have no key.
            shadow=ShadowGate(**doc["shadow"]) if doc.get("shadow") else None,
            # Plans stored before groups and scheduled starts existed have neither key.
            start_at=doc.get("start_at"),
        )


def _fraction(name: str, value: float | None) -> None:
    if value is not None and not (0.0 <= value <= 1.0):
        raise InvalidInputError(f"{name} must be between 0 and 1, not {value}")


def validate(plan: Plan) -> Plan:
    """Return ``plan`` if it makes sense, else raise naming the first problem."""
    if plan.target.empty:
        raise InvalidInputError("a rollout needs a target: devices, tags, a profile, a group, or all devices")
    if not plan.waves:
        raise InvalidInputError("a rollout needs at least one wave")
    if len(plan.waves) > MAX_WAVES:
        raise InvalidInputError(f"at most {MAX_WAVES} waves, got {len(plan.waves)}")
    for i, w in enumerate(plan.waves, 1):
        if (w.count is None) == (w.percent is None):
            raise InvalidInputError(f"wave {i}: give either a device count or a percentage, not both or none")
        if w.count is not None and w.count < 1:
            raise InvalidInputError(f"wave {i}: device count must be at least 1, not {w.count}")
        if w.percent is not None and not (0 < w.percent <= 100):
            raise InvalidInputError(f"wave {i}: percentage must be in (0, 100], not {w.percent}")
        if not (0 <= w.soak_s < math.inf):
            raise InvalidInputError(f"wave {i}: soak_s must be a non-negative number of seconds")
    g = plan.gates
    _fraction("gates.max_failure_fraction", g.max_failure_fraction)
    _fraction("gates.max_error_rate", g.max_error_rate)
    _fraction("gates.min_reporting_fraction", g.min_reporting_fraction)
    _fraction("probation_max_error_rate", plan.probation_max_error_rate)
    if g.max_latency_ratio is not None and g.max_latency_ratio <= 0:
        raise InvalidInputError(f"gates.max_latency_ratio must be positive, not {g.max_latency_ratio}")
    if g.min_confidence_ratio is not None and g.min_confidence_ratio <= 0:
        raise InvalidInputError(f"gates.min_confidence_ratio must be positive, not {g.min_confidence_ratio}")
    if g.max_prediction_psi is not None and g.max_prediction_psi <= 0:
        raise InvalidInputError(f"gates.max_prediction_psi must be positive, not {g.max_prediction_psi}")
    if g.min_inferences < 1:
        raise InvalidInputError(f"gates.min_inferences must be at least 1, not {g.min_inferences}")
    if plan.device_timeout_s is not None and plan.device_timeout_s <= 0:
        raise InvalidInputError(f"device_timeout_s must be positive, not {plan.device_timeout_s}")
    if plan.max_concurrent < 0:
        raise InvalidInputError(f"max_concurrent must be 0 (no limit) or more, not {plan.max_concurrent}")
    if plan.probation_s < 0:
        raise InvalidInputError(f"probation_s must not be negative, not {plan.probation_s}")
    if plan.shadow is not None:
        _validate_shadow(plan.shadow)
    if plan.start_at is not None and not math.isfinite(plan.start_at):
        raise InvalidInputError(f"start_at must be a time, not {plan.start_at}")
    return plan


def _validate_shadow(s: ShadowGate) -> None:
    if not (0 <= s.soak_s < math.inf):
        raise InvalidInputError(f"shadow.soak_s must be a non-negative number of seconds, not {s.soak_s}")
    _fraction("shadow.min_agreement", s.min_agreement)
    if s.max_deviation is not None and s.max_deviation < 0:
        raise InvalidInputError(f"shadow.max_deviation must not be negative, not {s.max_deviation}")
    if s.min_compared < 1:
        raise InvalidInputError(f"shadow.min_compared must be at least 1, not {s.min_compared}")


def split_waves(device_ids: Sequence[str], waves: Sequence[Wave]) -> list[list[str]]:
    """Cut the sorted target into waves; the last wave takes whatever is left.

    A percentage is of the whole target, rounded up, so a 10 % wave of 5 devices
    is one device, never zero. A wave left with no device stays, empty: the
    engine passes it at once.
    """
    ordered = sorted(dict.fromkeys(device_ids))
    total = len(ordered)
    out: list[list[str]] = []
    start = 0
    for i, w in enumerate(waves):
        if i == len(waves) - 1:
            size = total - start
        elif w.count is not None:
            size = w.count
        else:
            assert w.percent is not None
            size = math.ceil(total * w.percent / 100.0)
        chunk = ordered[start : start + size]
        start += len(chunk)
        out.append(chunk)
    return out
