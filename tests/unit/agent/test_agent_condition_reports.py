"""A device condition is reported at once when it begins or ends; hit again and again (a flood
of refused desired states), its new count and message go out at most once a progress interval."""

from __future__ import annotations

from dataclasses import replace

from agent.conditions import DESIRED_REFUSED, Condition
from agent.reconciler import PROGRESS_REPORT_INTERVAL_S, Current, ReportState, Wait, build_report, plan
from agent.state import DeviceState

NOW = 1000.0
REFUSED = Condition(DESIRED_REFUSED, "desired state generation 7 refused: not signed", since_ms=5, count=1)


def current(
    conditions: tuple[Condition, ...], reported_conditions: tuple[Condition, ...], at: float
) -> Current:
    base = Current(state=DeviceState(), conditions=reported_conditions)
    return replace(base, conditions=conditions, reported=build_report(None, base), reported_at=at)


def test_a_condition_that_begins_or_ends_is_reported_at_once() -> None:
    began = plan(None, current((REFUSED,), (), at=NOW - 0.1), NOW)
    assert isinstance(began[0], ReportState) and began[0].report.conditions == (REFUSED,)
    ended = plan(None, current((), (REFUSED,), at=NOW - 0.1), NOW)
    assert isinstance(ended[0], ReportState) and ended[0].report.conditions == ()


def test_repeated_hits_are_reported_once_a_progress_interval() -> None:
    again = replace(REFUSED, message="desired state generation 8 refused: not signed", count=2)
    soon = plan(None, current((again,), (REFUSED,), at=NOW - 0.1), NOW)
    assert soon == [Wait(NOW - 0.1 + PROGRESS_REPORT_INTERVAL_S, "progress report")]
    later = plan(None, current((again,), (REFUSED,), at=NOW - PROGRESS_REPORT_INTERVAL_S), NOW)
    assert isinstance(later[0], ReportState) and later[0].report.conditions == (again,)
