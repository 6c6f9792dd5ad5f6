"""How the operator CLI writes and reads times for people: ISO 8601 in the local zone out,
ISO 8601 or a duration ago in."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controller.cli_output import cell, parse_since, table

NOW = datetime(2026, 12, 7, 13, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "ago_s"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1.5d", 129600), ("0m", 0)]
)
def test_a_duration_is_that_long_before_now(text: str, ago_s: float) -> None:
    assert parse_since(text, NOW) == NOW - ago_s


def test_an_iso_time_is_local_unless_it_names_its_zone() -> None:
    assert parse_since("2026-12-07T13:30:00+00:00", 0) == NOW
    assert parse_since("2026-12-07T19:00+05:30", 0) == NOW
    naive = datetime(2026, 12, 7, 13, 30)
    assert parse_since("2026-12-07T13:30", 0) == naive.astimezone().timestamp()


@pytest.mark.parametrize("text", ["yesterday", "15 minutes", "-5m", ""])
def test_anything_else_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match="15m"):
        parse_since(text, NOW)


def test_times_are_shown_local_and_their_columns_lose_the_unit() -> None:
    local = datetime.fromtimestamp(NOW).astimezone().isoformat(timespec="seconds")
    assert cell("created_at", NOW) == local and cell("window_end_ms", NOW * 1000) == local
    assert cell("latency_ms", 12.5) == "12.5", "a duration in ms is not a time"
    rendered = table([{"window_end_ms": NOW * 1000, "latency_ms": 3.0}])
    assert [c.header for c in rendered.columns] == ["window end", "latency ms"]
