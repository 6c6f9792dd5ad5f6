"""Retraining policies: the pure decision as a table, and policy validation."""

from __future__ import annotations

from typing import Any

import pytest

from controller.errors import InvalidPolicy
from controller.retraining_policies import Observation, Policy, evaluate, parse_policy, policy_doc

WEBHOOK = {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "s" * 16}


def policy(**conditions: Any) -> Policy:
    return parse_policy(
        "p", {"model": "digits", "conditions": conditions, "cooldown_s": 100, "trigger": WEBHOOK}
    )


def drifting(*psi: float, version: str = "1") -> Observation:
    return Observation(version, [(1000 * i, v, v / 2) for i, v in enumerate(psi)])


DRIFT = {"drift": {"threshold": 0.25, "windows": 3}}


@pytest.mark.parametrize(
    ("conditions", "observations", "last_run_at", "fires"),
    [
        (DRIFT, [drifting(0.3, 0.4, 0.5)], None, ["drift"]),
        (DRIFT, [drifting(0.3, 0.1, 0.4, 0.5)], None, []),  # not K in a row
        (DRIFT, [drifting(0.4, 0.5)], None, []),  # fewer than K windows
        (DRIFT, [drifting(0.3, 0.4, 0.5)], 950.0, []),  # cooldown
        (DRIFT, [drifting(0.3, 0.4, 0.5)], 900.0, ["drift"]),  # cooldown over
        ({"drift": {"threshold": 0.2, "windows": 2, "metric": "kl"}}, [drifting(0.3, 0.5)], None, []),
        (
            {"accuracy": {"below": 0.8, "min_samples": 10}},
            [Observation("1", feedback=(0.7, 50))],
            None,
            ["accuracy"],
        ),
        ({"accuracy": {"below": 0.8, "min_samples": 10}}, [Observation("1", feedback=(0.7, 5))], None, []),
        ({"accuracy": {"below": 0.8}}, [Observation("1", feedback=(0.9, 50))], None, []),
        ({"schedule": {"every_s": 500}}, [], None, ["schedule"]),
        ({"schedule": {"every_s": 500}}, [], 600.0, []),
        ({"schedule": {"every_s": 500}, **DRIFT}, [drifting(0.3, 0.4, 0.5)], 400.0, ["drift"]),
    ],
)
def test_evaluate(
    conditions: dict[str, Any], observations: list[Observation], last_run_at: float | None, fires: list[str]
) -> None:
    decision = evaluate(policy(**conditions), observations, last_run_at, now=1000.0)
    assert ([f["condition"] for f in decision.fired] if decision else []) == fires


def test_the_first_drifting_version_fires_and_the_payload_says_why() -> None:
    decision = evaluate(
        policy(**DRIFT), [drifting(0.1, 0.1, 0.1, version="2"), drifting(0.3, 0.4, 0.5)], None, 0
    )
    assert decision is not None and decision.model_version == "1"
    (fired,) = decision.fired
    assert fired["values"] == [0.3, 0.4, 0.5] and fired["window_end_ms"] == 2000


def test_a_disabled_policy_never_fires() -> None:
    doc = {"model": "m", "conditions": {"schedule": {"every_s": 1}}, "trigger": WEBHOOK, "enabled": False}
    assert evaluate(parse_policy("p", doc), [], None, 10.0) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"conditions": DRIFT, "trigger": WEBHOOK}, "model must name"),
        ({"model": "m", "conditions": {}, "trigger": WEBHOOK}, "at least one"),
        ({"model": "m", "conditions": {"vibes": {}}, "trigger": WEBHOOK}, "unknown conditions: vibes"),
        ({"model": "m", "conditions": {"drift": {"threshold": -1}}, "trigger": WEBHOOK}, "threshold"),
        (
            {"model": "m", "conditions": {"drift": {"threshold": 1, "metric": "x"}}, "trigger": WEBHOOK},
            "psi or kl",
        ),
        ({"model": "m", "conditions": {"accuracy": {"below": 2}}, "trigger": WEBHOOK}, "fraction"),
        ({"model": "m", "conditions": DRIFT, "trigger": {**WEBHOOK, "secret": "short"}}, "16 characters"),
        ({"model": "m", "conditions": DRIFT, "trigger": {**WEBHOOK, "url": "ftp://x"}}, "http"),
        ({"model": "m", "conditions": DRIFT, "trigger": {"kind": "command", "command": "ls"}}, "argv"),
        ({"model": "m", "conditions": DRIFT, "trigger": {"kind": "email"}}, "webhook or command"),
        ({"model": "m", "conditions": DRIFT, "trigger": WEBHOOK, "cooldown_s": "1h"}, "cooldown_s"),
        ({"model": "m", "conditions": DRIFT, "trigger": WEBHOOK, "extra": 1}, "unknown policy fields: extra"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        parse_policy("p", doc)


def test_policy_documents_round_trip_and_hide_the_secret() -> None:
    p = policy(**DRIFT, accuracy={"below": 0.9})
    assert parse_policy("p", policy_doc(p)) == p
    public = p.public()
    assert "secret" not in public["trigger"] and public["trigger"]["secret_set"] is True
