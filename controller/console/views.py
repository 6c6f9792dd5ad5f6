"""What the console's pages show, computed from the service modules' domain objects.

Pure functions over the registry, fleet and rollout records, so the pages' figures are
tested without a browser and the templates only lay them out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.fleet import Device
from controller.rollout_engine import COMMANDS, Command
from controller.rollouts import RETRYABLE, Rollout, RolloutDevice, RolloutEvent

DEVICE_STATUSES = ("online", "offline", "updating", "failed")
UPDATING_PHASES = frozenset({"downloading", "verifying", "loading", "probation"})
# Rollout device states that are final for the device.
SETTLED = frozenset({"active", "failed", "rolled_back", "skipped"})


def device_status(device: Device) -> str:
    """offline; failed (a model the device reports failed); updating; or online."""
    if not device.online:
        return "offline"
    phases = {m.phase for m in device.reported.models} if device.reported else set()
    if "failed" in phases:
        return "failed"
    if phases & UPDATING_PHASES:
        return "updating"
    return "online"


def status_counts(devices: Iterable[Device]) -> dict[str, int]:
    counts = Counter(device_status(d) for d in devices)
    return {s: counts.get(s, 0) for s in DEVICE_STATUSES}


def filter_devices(
    devices: Iterable[Device],
    query: str = "",
    tag: str = "",
    profile: str = "",
    status: str = "",
    members: Collection[str] | None = None,
) -> list[Device]:
    """The devices matching every filter given; ``members``: those of the group chosen."""
    q = query.strip().lower()
    return [
        d
        for d in devices
        if (not q or q in d.device_id.lower() or any(q in t.lower() for t in d.tags))
        and (not tag or tag in d.tags)
        and (not profile or d.profile == profile)
        and (not status or device_status(d) == status)
        and (members is None or d.device_id in members)
    ]


@dataclass(frozen=True)
class Action:
    """A rollout command as a button: its route segment, its label, and the states it applies in."""

    command: str
    label: str
    states: tuple[str, ...]


_LABELS = {
    Command.PAUSE: "Pause",
    Command.RESUME: "Resume",
    Command.APPROVE: "Approve next wave",
    Command.PROMOTE: "Promote",
    Command.ABORT: "Abort",
    Command.ROLLBACK: "Roll back",
}


RETRY_FAILED = "retry-failed"


def actions() -> list[Action]:
    """Every command the engine knows, enabled in the states its transition table accepts it in,
    and retrying the failed devices where the rollouts service allows it."""
    commands = [
        Action(
            c.value,
            _LABELS.get(c, c.value.replace("_", " ").capitalize()),
            tuple(sorted(s.value for (s, cmd) in COMMANDS if cmd is c)),
        )
        for c in Command
    ]
    return [
        *commands,
        Action(RETRY_FAILED, "Retry failed devices", tuple(sorted(s.value for s in RETRYABLE))),
    ]


# A plan's gates as the rollout page states them; a gate set to None is left out.
_GATE_TEXT = {
    "max_failure_fraction": "devices failing to update at most {:.0%}",
    "max_error_rate": "error rate at most {:g}",
    "max_latency_ratio": "p95 latency at most {:g}x the previous version",
    "min_reporting_fraction": "devices reporting by the end of the soak at least {:.0%}",
    "min_inferences": "judged on devices with at least {} inferences",
    "min_confidence_ratio": "mean confidence at least {:g}x the previous version",
    "max_prediction_psi": "predicted-class PSI at most {:g}",
}


def gate_texts(plan: dict[str, object]) -> list[str]:
    gates = plan.get("gates")
    if not isinstance(gates, dict):
        return []
    texts = [text.format(gates[key]) for key, text in _GATE_TEXT.items() if gates.get(key) is not None]
    shadow = plan.get("shadow")
    if isinstance(shadow, dict):
        parts = [f"shadow for {shadow.get('soak_s', 0):g} s"]
        if shadow.get("min_agreement") is not None:
            parts.append(f"agreement at least {shadow['min_agreement']:g}")
        if shadow.get("max_deviation") is not None:
            parts.append(f"deviation at most {shadow['max_deviation']:g}")
        texts.append(", ".join(parts))
    return texts


@dataclass(frozen=True)
class WaveView:
    number: int
    size: int
    counts: dict[str, int]
    current: bool
    soak_s: float | None = None


@dataclass(frozen=True)
class RolloutView:
    rollout: Rollout
    done: int
    total: int
    waves: list[WaveView] = field(default_factory=list)

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0


def rollout_view(rollout: Rollout) -> RolloutView:
    """Progress (devices settled of all targeted) and each wave's device counts by state."""
    by_wave: dict[int, Counter[str]] = {}
    for d in rollout.devices:
        by_wave.setdefault(d.wave, Counter())[d.status] += 1
    planned = rollout.plan.get("waves") or []
    waves = [
        WaveView(
            n,
            sum(c.values()),
            dict(sorted(c.items())),
            n == rollout.wave,
            float(planned[n - 1]["soak_s"]) if 0 < n <= len(planned) else None,
        )
        for n, c in sorted(by_wave.items())
    ]
    done = sum(1 for d in rollout.devices if d.status in SETTLED)
    return RolloutView(rollout, done, len(rollout.devices), waves)


def device_rollouts(device_id: str, rollouts: Iterable[Rollout]) -> list[tuple[Rollout, RolloutDevice]]:
    """The rollouts that targeted a device, newest first, with where each left it and why."""
    found = [(r, d) for r in rollouts for d in r.devices if d.device_id == device_id]
    return sorted(found, key=lambda pair: pair[0].created_at, reverse=True)


EVENT_LOG_LIMIT = 200


def event_log(events: Sequence[RolloutEvent], limit: int = EVENT_LOG_LIMIT) -> list[RolloutEvent]:
    """The rollout's events newest first: waves, soaks, gate verdicts and operator commands, and
    what was sent to each device. A large rollout shows its latest ``limit``."""
    return list(reversed(events[-limit:]))


def active_rollouts(rollouts: Iterable[Rollout]) -> list[Rollout]:
    return [r for r in rollouts if r.status == "in_progress"]


def alerts(devices: Iterable[Device], rollouts: Iterable[Rollout]) -> list[tuple[str, str, str]]:
    """(severity, text, link) for what needs an operator: failed devices, the conditions devices
    report (a full disk, a refused desired state), stalled or failed rollouts."""
    found: list[tuple[str, str, str]] = []
    for d in devices:
        link = f"/ui/devices/{d.device_id}"
        if device_status(d) == "failed":
            errors = "; ".join(m.error for m in d.reported.models if m.error) if d.reported else ""
            found.append(("error", f"device {d.device_id} failed an update: {errors}", link))
        for c in d.reported.conditions if d.reported else []:
            found.append(("warning", f"device {d.device_id}: {c.kind}: {c.message}", link))
    for r in rollouts:
        if r.state in ("paused", "awaiting_approval", "rolling_back") or r.status == "failed":
            text = f"rollout {r.id} ({r.model} {r.version}) is {r.state}: {r.reason}"
            found.append(("warning" if r.status != "failed" else "error", text, f"/ui/rollouts/{r.id}"))
    return found


def validation_summary(report: dict[str, Any]) -> str:
    """The figures a variant was accepted or refused on, from its validation report."""
    if report.get("reference"):
        return "the reference the other variants are checked against"
    parts = []
    if "top1_agreement" in report:
        parts.append(f"top-1 agreement {report['top1_agreement']:.2%}")
    elif "relative_agreement" in report:
        parts.append(f"agreement {report['relative_agreement']:.2%}")
    if "gate" in report:
        parts.append(f"gate {report['gate']:.2%}")
    if "max_abs_deviation" in report:
        parts.append(f"max |deviation| {report['max_abs_deviation']:.3g}")
    if "samples" in report:
        parts.append(f"{report['samples']} samples")
    return ", ".join(parts)


def when(ts: float | None) -> str:
    """A Unix time as ISO 8601 UTC to the second (the page's script shows it in local time)."""
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
