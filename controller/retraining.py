"""Retraining: the service that keeps policies and runs, and the worker that calls triggers.

Policies (:mod:`controller.retraining_policies`) are versioned: a change adds a
version, and each run records the version that fired it. :meth:`Retraining.tick`
gathers what the fleet shows for each policy's model (drift windows, accuracy on
labelled feedback), asks the pure :func:`evaluate` whether it fires, and records
a run; a worker thread calls the run's trigger (:mod:`controller.retraining_triggers`)
and records the outcome. A pipeline reports the model version it registered with
:meth:`Retraining.complete`, which can start a rollout of it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from controller import retraining_triggers
from controller.baselines import Baselines
from controller.datasets import Datasets
from controller.errors import (
    ControllerError,
    InvalidPolicy,
    PolicyNotFound,
    RetrainingRunNotFound,
    TriggerError,
)
from controller.retraining_policies import Decision, Observation, Policy, evaluate, parse_policy, policy_doc
from controller.store import Store

log = logging.getLogger(__name__)

RUN_STATUSES = ("pending", "triggered", "failed", "succeeded")
MAX_DATASETS_IN_PAYLOAD = 100
# A version counts as in production while it sent drift sketches this recently.
VERSION_LOOKBACK_S = 3600.0


class Run(BaseModel):
    """One firing of a policy, as stored; a pydantic model because the API answers with it
    as it is (controller.api.loop_schemas.RunPublic)."""

    model_config = ConfigDict(frozen=True)

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
            detail = retraining_triggers.call(policy.trigger, body, run.id)
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
