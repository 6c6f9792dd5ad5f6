"""Retraining triggers: signing, and the triggers against a real HTTP server and a real command."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.errors import TriggerError
from controller.retraining_policies import parse_policy
from controller.retraining_triggers import post_webhook, run_command, sign, verify
from tests.support.webhook import Hook

WEBHOOK = {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "s" * 16}
DRIFT = {"drift": {"threshold": 0.25, "windows": 3}}


def test_signatures() -> None:
    body = b'{"run_id": "x"}'
    header = sign("k" * 16, body)
    assert header.startswith("sha256=") and verify("k" * 16, body, header)
    assert not verify("k" * 16, body + b" ", header) and not verify("j" * 16, body, header)


@pytest.fixture
def hook_factory() -> Iterator[Any]:
    hooks: list[Hook] = []

    def make(statuses: list[int]) -> Hook:
        hooks.append(Hook(statuses))
        return hooks[-1]

    yield make
    for h in hooks:
        h.close()


def test_webhook_retries_with_jittered_backoff_then_succeeds(hook_factory: Any) -> None:
    hook = hook_factory([500, 503])
    trigger = parse_policy(
        "p", {"model": "m", "conditions": DRIFT, "trigger": {**WEBHOOK, "url": hook.url}}
    ).trigger
    sleeps: list[float] = []
    body = json.dumps({"run_id": "r1"}).encode()
    detail = post_webhook(trigger, body, "r1", sleep=sleeps.append, rng=lambda lo, hi: hi)
    assert "after 3 attempt" in detail
    assert sleeps == [1.5, 1.5**2]
    headers, received = hook.requests[-1]
    assert received == body and headers["X-EdgeFleet-Run"] == "r1"
    assert verify(trigger.secret, received, headers["X-EdgeFleet-Signature"])


def test_webhook_gives_up_after_max_attempts_and_on_a_client_error(hook_factory: Any) -> None:
    hook = hook_factory([500, 500, 500])
    doc: dict[str, Any] = {
        "model": "m",
        "conditions": DRIFT,
        "trigger": {**WEBHOOK, "url": hook.url, "max_attempts": 2},
    }
    trigger = parse_policy("p", doc).trigger
    with pytest.raises(TriggerError, match="after 2 attempts"):
        post_webhook(trigger, b"{}", "r", sleep=lambda s: None)
    refusing = hook_factory([403])
    trigger = parse_policy("p", {**doc, "trigger": {**doc["trigger"], "url": refusing.url}}).trigger
    with pytest.raises(TriggerError, match="refused"):
        post_webhook(trigger, b"{}", "r", sleep=lambda s: None)
    assert len(refusing.requests) == 1


def test_command_trigger_gets_the_payload_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "payload.json"
    script = f"import sys, os; open({str(out)!r}, 'wb').write(os.environ['EDGEFLEET_RUN_ID'].encode() + sys.stdin.buffer.read())"
    doc = {
        "model": "m",
        "conditions": DRIFT,
        "trigger": {"kind": "command", "command": [sys.executable, "-c", script]},
    }
    assert run_command(parse_policy("p", doc).trigger, b"{}", "run9") == "command exited 0"
    assert out.read_bytes() == b"run9{}"
    failing = {
        **doc,
        "trigger": {"kind": "command", "command": [sys.executable, "-c", "import sys; sys.exit('no data')"]},
    }
    with pytest.raises(TriggerError, match="exited 1: no data"):
        run_command(parse_policy("p", failing).trigger, b"{}", "r")
