"""Retraining triggers: how a fired run reaches the pipeline that retrains the model.

A webhook gets an HTTP POST of the run's JSON payload, signed with HMAC-SHA256
over the body (:func:`sign`; the receiver checks it with :func:`verify`) and
retried with jittered backoff until a 2xx answer or a final refusal. A command
gets the payload on its stdin, the run's id in its environment, and no shell.
Either raises :class:`TriggerError` with what went wrong, which the run keeps.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import subprocess
import time
from collections.abc import Callable

import httpx

from controller.backoff import Uniform, backoff_delay
from controller.errors import TriggerError
from controller.retraining_policies import Trigger

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-EdgeFleet-Signature"
RUN_HEADER = "X-EdgeFleet-Run"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(secret, body), header)


def post_webhook(
    trigger: Trigger,
    body: bytes,
    run_id: str,
    sleep: Callable[[float], None] = time.sleep,
    rng: Uniform = random.uniform,
) -> str:
    """POST until a 2xx answer; a 4xx other than 408/429 is final. Returns what happened."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(trigger.secret, body),
        RUN_HEADER: run_id,
    }
    last = ""
    for attempt in range(1, trigger.max_attempts + 1):
        try:
            response = httpx.post(trigger.url, content=body, headers=headers, timeout=trigger.timeout_s)
        except httpx.HTTPError as exc:
            last = f"attempt {attempt}: {type(exc).__name__}: {exc}"
        else:
            if response.is_success:
                return f"webhook answered {response.status_code} after {attempt} attempt(s)"
            last = f"attempt {attempt}: HTTP {response.status_code} {response.text[:200]!r}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                raise TriggerError(f"webhook refused the run: {last}")
        log.warning("retraining webhook failed run=%s url=%s %s", run_id, trigger.url, last)
        if attempt < trigger.max_attempts:
            sleep(backoff_delay(attempt, rng))
    raise TriggerError(f"webhook failed after {trigger.max_attempts} attempts; last {last}")


def run_command(trigger: Trigger, body: bytes, run_id: str) -> str:
    try:
        done = subprocess.run(
            list(trigger.command),
            input=body,
            capture_output=True,
            timeout=trigger.timeout_s,
            env={"EDGEFLEET_RUN_ID": run_id, "PATH": "/usr/local/bin:/usr/bin:/bin"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TriggerError(f"command {trigger.command[0]!r} failed: {exc}") from None
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        raise TriggerError(f"command exited {done.returncode}: {tail}")
    return "command exited 0"


def call(trigger: Trigger, body: bytes, run_id: str) -> str:
    """Call the trigger as its kind says (retrying as the policy says); returns what happened."""
    if trigger.kind == "webhook":
        return post_webhook(trigger, body, run_id)
    return run_command(trigger, body, run_id)
