"""Progress the operator watches: an upload's bytes, the variants the controller produces
from it, and a rollout's waves until it ends. Drawn on stderr (stdout keeps the result),
and only on a terminal; with ``--json`` nothing is drawn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from controller import cli_output, cli_views

VARIANT_DONE = ("ready", "rejected", "failed")
ROLLOUT_ENDED = ("succeeded", "failed", "rolled_back", "aborted", "superseded")


def _drawn() -> bool:
    return not cli_output.json_mode() and cli_output.stderr().is_terminal


def transfer() -> Progress:
    """A bar for bytes sent (``Progress.wrap_file`` around the file being uploaded)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=cli_output.stderr(),
        disable=not _drawn(),
        transient=True,
    )


def rows() -> Progress:
    """A bar per table for rows written (an export); a table's total once the API says it."""
    return Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=cli_output.stderr(),
        disable=not _drawn(),
        transient=True,
    )


def variants_pending(version: dict[str, Any]) -> bool:
    return any(v["status"] not in VARIANT_DONE for v in version.get("variants", []))


def wait_for_variants(
    fetch: Callable[[], dict[str, Any]], version: dict[str, Any], timeout_s: float, interval_s: float = 0.5
) -> dict[str, Any]:
    """Poll the version until every variant is ready, rejected or failed (or ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    bars = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}"),
        console=cli_output.stderr(),
        disable=not _drawn(),
    )
    tasks: dict[str, TaskID] = {}
    with bars:
        while True:
            for variant in version.get("variants", []):
                name = variant["variant"]
                if name not in tasks:
                    tasks[name] = bars.add_task(name, total=1.0, status="")
                bars.update(
                    tasks[name], completed=float(variant["progress"] or 0.0), status=variant["status"]
                )
            if not variants_pending(version) or time.monotonic() > deadline:
                return version
            time.sleep(interval_s)
            version = fetch()


def watch_rollout(
    fetch: Callable[[], dict[str, Any]],
    fetch_events: Callable[[], list[dict[str, Any]]],
    interval_s: float,
) -> dict[str, Any]:
    """Redraw the rollout (waves, device counts by state, gate verdicts) until it ends; the
    caller prints the final state on stdout."""
    live = Live(console=cli_output.stderr(), auto_refresh=False, transient=True) if _drawn() else None
    with live or contextlib.nullcontext():
        while True:
            current = fetch()
            if live is not None:
                live.update(Group(*cli_views.rollout(current, fetch_events())), refresh=True)
            if rollout_ended(current):
                return current
            time.sleep(interval_s)


def rollout_ended(rollout: dict[str, Any]) -> bool:
    return rollout["status"] != "in_progress" or rollout["state"] in ROLLOUT_ENDED


def rollout_exit_code(rollout: dict[str, Any]) -> int:
    """0 when it succeeded; 1 when it failed, was rolled back, aborted or superseded."""
    return 0 if rollout["status"] == "succeeded" and rollout["state"] not in ROLLOUT_ENDED[1:] else 1
