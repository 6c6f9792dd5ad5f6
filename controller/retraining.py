"""Retraining policies: when a model has gone stale, call a pipeline that retrains it.

A policy names a model, conditions (drift above a threshold for K consecutive
fleet-wide windows; accuracy on labelled feedback below a threshold; a
schedule), a cooldown, and a trigger: a webhook (HTTP POST of a JSON payload
signed with HMAC-SHA256, retried with jittered backoff) or a local command (the
payload on its stdin). Policies are versioned: a change adds a version, and
each run records the version that fired it. A pipeline reports the model
version it registered with :meth:`Retraining.complete`, which can start a
rollout of it.

:func:`evaluate` is the pure decision; :class:`Retraining` gathers what it
needs, records runs and executes triggers on a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import random
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from controller.baselines import Baselines
from controller.datasets import Datasets
from controller.errors import (
    ControllerError,
    InvalidPolicy,
    PolicyNotFound,
    RetrainingRunNotFound,
    TriggerError,
)
from controller.store import Store

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-EdgeFleet-Signature"
RUN_HEADER = "X-EdgeFleet-Run"
POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUN_STATUSES = ("pending", "triggered", "failed", "succeeded")
MAX_DATASETS_IN_PAYLOAD = 100
# A version counts as in production while it sent drift sketches this recently.
VERSION_LOOKBACK_S = 3600.0


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
    if not POLICY_NAME.match(name):
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


# -- triggers ----------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(secret, body), header)


def backoff_delay(attempt: int, rng: Callable[[float, float], float] = random.uniform) -> float:
    return rng(0, 1.5 ** min(10, attempt))


def post_webhook(
    trigger: Trigger,
    body: bytes,
    run_id: str,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[float, float], float] = random.uniform,
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


# -- the executor --------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    id: str
    policy_name: str
    policy_version: int
    model_name: str
    model_version: str
    fired: list[dict[str, Any]]
    datasets: list[str]
    status: str
    detail: str
    attempts: int
    result_version: str
    created_at: float
    updated_at: float


def _run_from_row(r: dict[str, Any]) -> Run:
    return Run(
        id=r["id"],
        policy_name=r["policy_name"],
        policy_version=r["policy_version"],
        model_name=r["model_name"],
        model_version=r["model_version"],
        fired=json.loads(r["fired"]),
        datasets=json.loads(r["datasets"]),
        status=r["status"],
        detail=r["detail"],
        attempts=r["attempts"],
        result_version=r["result_version"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


RolloutStarter = Callable[[str, str, Mapping[str, Any]], str]


class Retraining:
    def __init__(
        self,
        store: Store,
        baselines: Baselines,
        datasets: Datasets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.baselines = baselines
        self.datasets = datasets
        self.clock = clock
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # -- policies ------------------------------------------------------------

    def put_policy(self, name: str, doc: Mapping[str, Any]) -> Policy:
        """Create a policy, or add a version of it; the newest version is the one in force."""
        policy = parse_policy(name, doc)
        with self.store.transaction():
            row = self.store.query_one(
                "SELECT max(version) AS v FROM retraining_policies WHERE name = ?", (name,)
            )
            version = (row["v"] or 0) + 1 if row else 1
            self.store.execute(
                "INSERT INTO retraining_policies (name, version, model_name, doc, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, version, policy.model_name, json.dumps(policy_doc(policy)), self.clock()),
            )
        log.info("retraining policy saved policy=%s version=%d model=%s", name, version, policy.model_name)
        return self.policy(name, version)

    def policy(self, name: str, version: int | None = None) -> Policy:
        if version is None:
            row = self.store.query_one(
                "SELECT * FROM retraining_policies WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
        else:
            row = self.store.query_one(
                "SELECT * FROM retraining_policies WHERE name = ? AND version = ?", (name, version)
            )
        if row is None:
            raise PolicyNotFound(
                f"no retraining policy {name!r}" + (f" version {version}" if version else "")
            )
        policy = parse_policy(name, json.loads(row["doc"]))
        return Policy(**{**policy.__dict__, "version": row["version"]})

    def policies(self) -> list[Policy]:
        rows = self.store.query("SELECT DISTINCT name FROM retraining_policies ORDER BY name")
        return [self.policy(r["name"]) for r in rows]

    def policy_versions(self, name: str) -> list[Policy]:
        rows = self.store.query(
            "SELECT version FROM retraining_policies WHERE name = ? ORDER BY version", (name,)
        )
        if not rows:
            raise PolicyNotFound(f"no retraining policy {name!r}")
        return [self.policy(name, r["version"]) for r in rows]

    # -- runs ----------------------------------------------------------------------

    def runs(self, policy_name: str | None = None, limit: int = 100) -> list[Run]:
        sql = "SELECT * FROM retraining_runs"
        params: list[Any] = []
        if policy_name is not None:
            sql += " WHERE policy_name = ?"
            params.append(policy_name)
        rows = self.store.query(
            sql + " ORDER BY created_at DESC, id LIMIT ?", [*params, max(1, min(limit, 1000))]
        )
        return [_run_from_row(r) for r in rows]

    def run(self, run_id: str) -> Run:
        row = self.store.query_one("SELECT * FROM retraining_runs WHERE id = ?", (run_id,))
        if row is None:
            raise RetrainingRunNotFound(f"no retraining run {run_id!r}")
        return _run_from_row(row)

    def _last_run_at(self, name: str) -> float | None:
        row = self.store.query_one(
            "SELECT max(created_at) AS t FROM retraining_runs WHERE policy_name = ?", (name,)
        )
        return row["t"] if row and row["t"] is not None else None

    def _observations(self, policy: Policy, last_run_at: float | None, now: float) -> list[Observation]:
        # Windows the previous run saw do not count again; and only the newest few
        # windows can decide, so only they are scored (a day of a large fleet's
        # sketches would not fit in one tick).
        seen = last_run_at if last_run_at is not None else 0.0
        bucket_s = self.baselines.bucket_ms / 1000
        lookback = (policy.drift.windows + 2) * bucket_s if policy.drift else 0.0
        since_ms = int(max(seen, now - lookback) * 1000)
        now_ms = int(now * 1000)
        active_since = int(max(seen, now - VERSION_LOOKBACK_S) * 1000)
        versions = [
            v for n, v in self.baselines.versions_with_sketches(active_since) if n == policy.model_name
        ]
        labelled = {d.manifest.model_version for d in self.datasets.find(policy.model_name) if d.labelled}
        out = []
        for version in sorted(set(versions) | labelled, reverse=True):
            windows = [
                (w.window_end_ms, w.score.psi, w.score.kl)
                for w in self.baselines.fleet_scores(policy.model_name, version, since_ms)
                if w.window_end_ms <= now_ms  # only windows that have closed
            ]
            feedback = (
                self.datasets.feedback_accuracy(policy.model_name, version)
                if policy.accuracy and version in labelled
                else None
            )
            out.append(Observation(version, windows, feedback))
        return out

    def tick(self, now: float | None = None) -> list[Run]:
        """Evaluate every policy once; start the runs that fire."""
        now = self.clock() if now is None else now
        started = []
        for policy in self.policies():
            try:
                last = self._last_run_at(policy.name)
                decision = evaluate(policy, self._observations(policy, last, now), last, now)
                if decision is not None:
                    started.append(self.fire(policy, decision))
            except ControllerError as exc:
                log.error("retraining policy not evaluated policy=%s error=%s", policy.name, exc)
        return started

    def fire(self, policy: Policy, decision: Decision) -> Run:
        now = self.clock()
        datasets = [
            d.digest
            for d in self.datasets.find(policy.model_name)
            if not decision.model_version or d.manifest.model_version == decision.model_version
        ][-MAX_DATASETS_IN_PAYLOAD:]
        run_id = uuid.uuid4().hex
        self.store.execute(
            "INSERT INTO retraining_runs (id, policy_name, policy_version, model_name, model_version, fired,"
            " datasets, status, detail, attempts, result_version, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', '', 0, '', ?, ?)",
            (
                run_id,
                policy.name,
                policy.version,
                policy.model_name,
                decision.model_version,
                json.dumps(decision.fired),
                json.dumps(datasets),
                now,
                now,
            ),
        )
        log.warning(
            "retraining fired run=%s policy=%s policy_version=%d model=%s version=%s conditions=%s datasets=%d",
            run_id,
            policy.name,
            policy.version,
            policy.model_name,
            decision.model_version,
            ",".join(f["condition"] for f in decision.fired),
            len(datasets),
        )
        self._jobs.put(run_id)
        return self.run(run_id)

    def payload(self, run: Run) -> dict[str, Any]:
        sets = []
        for digest in run.datasets:
            d = self.datasets.get(digest)
            sets.append(
                {
                    "digest": d.digest,
                    "samples": d.samples,
                    "device_id": d.manifest.device_id,
                    "model_version": d.manifest.model_version,
                    "start_ms": d.manifest.start_ms,
                    "end_ms": d.manifest.end_ms,
                    "policy_id": d.manifest.policy_id,
                    "labelled": d.labelled,
                    "labels_digest": d.labels_digest,
                    "download": f"/v1/datasets/{d.digest}/download",
                }
            )
        return {
            "run_id": run.id,
            "policy": {"name": run.policy_name, "version": run.policy_version},
            "model": {"name": run.model_name, "version": run.model_version},
            "fired": run.fired,
            "datasets": sets,
            "created_at": run.created_at,
            "sent_at": self.clock(),
            "report_to": f"/v1/retraining/runs/{run.id}/result",
        }

    def execute(self, run_id: str) -> Run:
        """Call the run's trigger (retrying as the policy says) and record the outcome."""
        run = self.run(run_id)
        policy = self.policy(run.policy_name, run.policy_version)
        body = json.dumps(self.payload(run), sort_keys=True).encode()
        try:
            if policy.trigger.kind == "webhook":
                detail = post_webhook(policy.trigger, body, run.id)
            else:
                detail = run_command(policy.trigger, body, run.id)
            status = "triggered"
        except TriggerError as exc:
            detail, status = str(exc), "failed"
        self.store.execute(
            "UPDATE retraining_runs SET status = ?, detail = ?, attempts = attempts + 1, updated_at = ?"
            " WHERE id = ? AND status = 'pending'",
            (status, detail, self.clock(), run.id),
        )
        log.log(
            logging.ERROR if status == "failed" else logging.INFO,
            "retraining run %s run=%s policy=%s detail=%r",
            status,
            run.id,
            run.policy_name,
            detail,
        )
        return self.run(run_id)

    def complete(self, run_id: str, version: str, start_rollout: RolloutStarter) -> tuple[Run, str]:
        """A pipeline registered ``version``; start the policy's rollout of it, if it has one
        (``start_rollout`` starts it and returns its id)."""
        run = self.run(run_id)
        if run.status in ("succeeded",):
            raise InvalidPolicy(f"run {run_id} already reported version {run.result_version}")
        policy = self.policy(run.policy_name, run.policy_version)
        rollout_id = ""
        if policy.rollout is not None:
            rollout_id = start_rollout(run.model_name, version, policy.rollout)
        detail = f"registered {run.model_name} {version}" + (f"; rollout {rollout_id}" if rollout_id else "")
        self.store.execute(
            "UPDATE retraining_runs SET status = 'succeeded', result_version = ?, detail = ?, updated_at = ?"
            " WHERE id = ?",
            (version, detail, self.clock(), run_id),
        )
        log.info("retraining run succeeded run=%s version=%s rollout=%s", run_id, version, rollout_id or "-")
        return self.run(run_id), rollout_id

    # -- worker ----------------------------------------------------------------------

    def start(self) -> None:
        for r in self.store.query("SELECT id FROM retraining_runs WHERE status = 'pending'"):
            self._jobs.put(r["id"])  # a restart resumes runs whose trigger never finished
        self._worker = threading.Thread(target=self._work, name="retraining", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None

    def _work(self) -> None:
        while (run_id := self._jobs.get()) is not None:
            try:
                self.execute(run_id)
            except Exception:
                log.exception("retraining run failed to execute run=%s", run_id)
