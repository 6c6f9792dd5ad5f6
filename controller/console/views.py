"""What the console's pages show, computed from the service modules' domain objects.

Pure functions over the registry, fleet and rollout records, so the pages' figures are
tested without a browser and the templates only lay them out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from controller.fleet import Device
from controller.rollouts import Rollout, RolloutEvent

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
    devices: Iterable[Device], query: str = "", tag: str = "", profile: str = "", status: str = ""
) -> list[Device]:
    q = query.strip().lower()
    return [
        d
        for d in devices
        if (not q or q in d.device_id.lower() or any(q in t.lower() for t in d.tags))
        and (not tag or tag in d.tags)
        and (not profile or d.profile == profile)
        and (not status or device_status(d) == status)
    ]


@dataclass(frozen=True)
class WaveView:
    number: int
    size: int
    counts: dict[str, int]
    current: bool


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
    waves = [
        WaveView(n, sum(c.values()), dict(sorted(c.items())), n == rollout.wave)
        for n, c in sorted(by_wave.items())
    ]
    done = sum(1 for d in rollout.devices if d.status in SETTLED)
    return RolloutView(rollout, done, len(rollout.devices), waves)


def verdicts(events: Sequence[RolloutEvent]) -> list[RolloutEvent]:
    """The rollout-level events (waves started, soaks, gate verdicts, pauses), newest first."""
    return [e for e in reversed(events) if not e.device_id]


def active_rollouts(rollouts: Iterable[Rollout]) -> list[Rollout]:
    return [r for r in rollouts if r.status == "in_progress"]


def alerts(devices: Iterable[Device], rollouts: Iterable[Rollout]) -> list[tuple[str, str, str]]:
    """(severity, text, link) for what needs an operator: failed devices, stalled or failed rollouts."""
    found: list[tuple[str, str, str]] = []
    for d in devices:
        if device_status(d) == "failed":
            errors = "; ".join(m.error for m in d.reported.models if m.error) if d.reported else ""
            found.append(
                ("error", f"device {d.device_id} failed an update: {errors}", f"/ui/devices/{d.device_id}")
            )
    for r in rollouts:
        if r.state in ("paused", "awaiting_approval", "rolling_back") or r.status == "failed":
            text = f"rollout {r.id} ({r.model} {r.version}) is {r.state}: {r.reason}"
            found.append(("warning" if r.status != "failed" else "error", text, f"/ui/rollouts/{r.id}"))
    return found


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
