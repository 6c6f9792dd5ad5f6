"""Retraining policies: what an operator writes, and the pure decision of when one fires.

A policy names a model, conditions (drift above a threshold for K consecutive
fleet-wide windows; accuracy on labelled feedback below a threshold; a
schedule), a cooldown, a trigger (:mod:`controller.retraining_triggers` calls
it) and the rollout of the version a run registers. :func:`parse_policy`
refuses a bad document with an :class:`InvalidPolicy` naming the first problem;
:func:`evaluate` decides, from what the fleet shows and a clock, whether a
policy fires now. Pure code: no I/O (:mod:`controller.retraining` gathers the
observations and records the runs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from controller.errors import InvalidPolicy

POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# -- policy documents ------------------------------------------------------------


@dataclass(frozen=True)
class DriftCondition:
    threshold: float
    windows: int = 3
    metric: Literal["psi", "kl"] = "psi"


@dataclass(frozen=True)
class AccuracyCondition:
    below: float
    min_samples: int = 20


@dataclass(frozen=True)
class ScheduleCondition:
    every_s: float


@dataclass(frozen=True)
class Trigger:
    kind: Literal["webhook", "command"]
    url: str = ""
    secret: str = ""
    command: tuple[str, ...] = ()
    timeout_s: float = 10.0
    max_attempts: int = 5


@dataclass(frozen=True)
class Policy:
    name: str
    model_name: str
    trigger: Trigger
    drift: DriftCondition | None = None
    accuracy: AccuracyCondition | None = None
    schedule: ScheduleCondition | None = None
    cooldown_s: float = 3600.0
    enabled: bool = True
    # The rollout of the version a run registers: a POST /v1/rollouts body without
    # model and version (devices or target, waves, gates, failure_action, ...).
    rollout: Mapping[str, Any] | None = None
    version: int = 0

    def public(self) -> dict[str, Any]:
        doc = policy_doc(self)
        doc["trigger"].pop("secret", None)
        doc["trigger"]["secret_set"] = bool(self.trigger.secret)
        return {"name": self.name, "version": self.version, **doc}


def _number(doc: Mapping[str, Any], key: str, default: float | None = None, minimum: float = 0.0) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise InvalidPolicy(f"{key} must be a number >= {minimum}, not {value!r}")
    return float(value)


def parse_policy(name: str, doc: Mapping[str, Any]) -> Policy:
    """A policy from its JSON document; InvalidPolicy names the first problem."""
    if not POLICY_NAME.fullmatch(name):
        raise InvalidPolicy(f"invalid policy name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    known = {"model", "conditions", "cooldown_s", "trigger", "enabled", "rollout"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidPolicy(f"unknown policy fields: {', '.join(unknown)}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidPolicy("model must name a model")
    conditions = doc.get("conditions") or {}
    if not isinstance(conditions, dict) or not conditions:
        raise InvalidPolicy("conditions must hold at least one of drift, accuracy, schedule")
    extra = sorted(set(conditions) - {"drift", "accuracy", "schedule"})
    if extra:
        raise InvalidPolicy(f"unknown conditions: {', '.join(extra)}")
    for key, value in conditions.items():
        if value is not None and not isinstance(value, dict):
            raise InvalidPolicy(f"conditions.{key} must be an object, not {value!r}")
    drift = accuracy = schedule = None
    if (d := conditions.get("drift")) is not None:
        metric = d.get("metric", "psi")
        if metric not in ("psi", "kl"):
            raise InvalidPolicy(f"drift metric must be psi or kl, not {metric!r}")
        windows = int(_number(d, "windows", 3, 1))
        drift = DriftCondition(_number(d, "threshold"), windows, metric)
    if (a := conditions.get("accuracy")) is not None:
        below = _number(a, "below")
        if below > 1:
            raise InvalidPolicy("accuracy below must be a fraction between 0 and 1")
        accuracy = AccuracyCondition(below, int(_number(a, "min_samples", 20, 1)))
    if (s := conditions.get("schedule")) is not None:
        schedule = ScheduleCondition(_number(s, "every_s", None, 1))
    return Policy(
        name=name,
        model_name=model,
        trigger=parse_trigger(doc.get("trigger")),
        drift=drift,
        accuracy=accuracy,
        schedule=schedule,
        cooldown_s=_number(doc, "cooldown_s", 3600.0),
        enabled=bool(doc.get("enabled", True)),
        rollout=_rollout(doc.get("rollout")),
    )


def parse_trigger(doc: Any) -> Trigger:
    if not isinstance(doc, dict):
        raise InvalidPolicy("trigger must be an object with kind webhook or command")
    kind = doc.get("kind")
    timeout = _number(doc, "timeout_s", 10.0, 0.1)
    attempts = int(_number(doc, "max_attempts", 5, 1))
    if kind == "webhook":
        url = doc.get("url", "")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidPolicy("a webhook trigger needs an http(s) url")
        secret = doc.get("secret", "")
        if not isinstance(secret, str) or len(secret) < 16:
            raise InvalidPolicy("a webhook trigger needs a secret of at least 16 characters (HMAC key)")
        return Trigger("webhook", url=url, secret=secret, timeout_s=timeout, max_attempts=attempts)
    if kind == "command":
        command = doc.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise InvalidPolicy("a command trigger needs command: a non-empty list of strings (argv)")
        return Trigger("command", command=tuple(command), timeout_s=timeout, max_attempts=attempts)
    raise InvalidPolicy(f"trigger kind must be webhook or command, not {kind!r}")


def _rollout(doc: Any) -> Mapping[str, Any] | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or "model" in doc or "version" in doc:
        raise InvalidPolicy("rollout must be a rollout body without model and version, e.g. {devices: [...]}")
    return dict(doc)


def policy_doc(policy: Policy) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    for key in ("drift", "accuracy", "schedule"):
        cond = getattr(policy, key)
        if cond is not None:
            conditions[key] = asdict(cond)
    trigger = {k: v for k, v in asdict(policy.trigger).items() if v not in ("", ())}
    if policy.trigger.command:
        trigger["command"] = list(policy.trigger.command)
    doc: dict[str, Any] = {
        "model": policy.model_name,
        "conditions": conditions,
        "cooldown_s": policy.cooldown_s,
        "trigger": trigger,
        "enabled": policy.enabled,
    }
    if policy.rollout is not None:
        doc["rollout"] = dict(policy.rollout)
    return doc


# -- the decision (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the fleet shows for one version of the policy's model."""

    model_version: str
    # Complete fleet-wide windows newer than the last run, oldest first: (window_end_ms, psi, kl).
    drift_windows: Sequence[tuple[int, float, float]] = ()
    # (accuracy, labelled samples) of the version's predictions on labelled captured data.
    feedback: tuple[float, int] | None = None


@dataclass(frozen=True)
class Decision:
    model_version: str
    fired: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    policy: Policy, observations: Sequence[Observation], last_run_at: float | None, now: float
) -> Decision | None:
    """Whether ``policy`` fires now, for which version, and which conditions did it."""
    if not policy.enabled:
        return None
    if last_run_at is not None and now - last_run_at < policy.cooldown_s:
        return None
    for obs in observations:
        fired: list[dict[str, Any]] = []
        if policy.drift is not None:
            cond = policy.drift
            values = [psi if cond.metric == "psi" else kl for _, psi, kl in obs.drift_windows]
            recent = values[-cond.windows :]
            if len(recent) == cond.windows and all(v > cond.threshold for v in recent):
                fired.append(
                    {
                        "condition": "drift",
                        "metric": cond.metric,
                        "threshold": cond.threshold,
                        "windows": cond.windows,
                        "values": recent,
                        "window_end_ms": obs.drift_windows[-1][0],
                    }
                )
        if policy.accuracy is not None and obs.feedback is not None:
            acc, samples = obs.feedback
            if samples >= policy.accuracy.min_samples and acc < policy.accuracy.below:
                fired.append(
                    {
                        "condition": "accuracy",
                        "below": policy.accuracy.below,
                        "value": acc,
                        "samples": samples,
                    }
                )
        if fired:
            return Decision(obs.model_version, fired)
    if policy.schedule is not None and (last_run_at is None or now - last_run_at >= policy.schedule.every_s):
        version = observations[0].model_version if observations else ""
        return Decision(version, [{"condition": "schedule", "every_s": policy.schedule.every_s}])
    return None
