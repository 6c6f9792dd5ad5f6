"""The closed loop assembled: roll-ups, drift baselines, captured data sets and
retraining policies, plus the maintenance thread that prunes old telemetry and
evaluates the policies every ``maintenance_interval_s``.

Where several controller processes share the database, the maintenance thread and the
retraining worker run only in the process holding the maintenance lease (controller.leases);
roll-ups and drift sketches are written by every ingest process as windows arrive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from controller.baselines import Baselines, baselines_from_calibration
from controller.capture_policies import DesiredMonitoring
from controller.datasets import Datasets
from controller.leases import Lease
from controller.optimize import MEMORY_FACTOR
from controller.registry import Registry
from controller.retraining import Retraining
from controller.rollups import DAY_S, Retention, Rollups
from controller.settings import Settings
from controller.store import Store
from controller.telemetry import TelemetryStore

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


class ClosedLoop:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        telemetry: TelemetryStore,
        registry: Registry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        retention = Retention(
            telemetry_s=settings.telemetry_retention_days * DAY_S,
            rollup_s=settings.rollup_retention_days * DAY_S,
        )
        self.rollups = Rollups(store, settings.rollup_window_s, retention, clock)
        self.baselines = Baselines(store, settings.rollup_window_s, clock)
        self.datasets = Datasets(store, settings.data_dir / "datasets", clock)
        self.retraining = Retraining(store, self.baselines, self.datasets, clock)
        self.desired = DesiredMonitoring(store, self.baselines, clock)
        self.registry = registry
        self._no_calibration_baseline: set[tuple[str, str]] = set()
        telemetry.batch_observers += [self.rollups.observe_many, self.baselines.observe_many]
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # None: this process alone runs the loop; else only while it holds this lease.
        self.lease: Lease | None = None
        # Whether this process runs the loop now (and the retraining worker with it).
        self._leading = False
        self._last_prune = 0.0
        # Other parts' maintenance, run by the same tick (the revocation list's renewal).
        self.extra_steps: list[tuple[str, Callable[[], object]]] = []

    def tick(self) -> None:
        """One maintenance pass; each part fails alone."""
        now = self.clock()
        for name, step in (
            ("baselines", self.baselines.all),
            (
                "calibration baselines",
                lambda: baselines_from_calibration(
                    self.baselines,
                    self.registry,
                    self.registry.artifacts.path,
                    self._no_calibration_baseline,
                    MEMORY_FACTOR * self.settings.max_model_memory_bytes,
                ),
            ),
            ("desired", self.desired.reconcile),
            ("retraining", lambda: self.retraining.tick(now)),
            ("staging", lambda: self.datasets.expire_uploads(now)),
            *self.extra_steps,
        ):
            try:
                step()
            except Exception:
                log.exception("maintenance step failed step=%s", name)
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            try:
                self.rollups.prune(now)
            except Exception:
                log.exception("maintenance step failed step=prune")

    def start(self) -> None:
        self._stop.clear()
        self._lead()
        self._thread = threading.Thread(target=self._run, name="closed-loop", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tick now (the lease was just taken) rather than at the end of the interval."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.maintenance_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._lead():
                self.tick()

    def _lead(self) -> bool:
        """Whether this process runs the loop now; the retraining worker (which resumes the runs
        left pending) starts when it begins to and stops when it no longer does."""
        leading = self.lease is None or self.lease.held
        if leading and not self._leading:
            self.retraining.start()
        elif not leading and self._leading:
            log.warning("maintenance lease lost: this process stops running the maintenance loop")
            self.retraining.stop()
        self._leading = leading
        return leading

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._leading:
            self.retraining.stop(timeout)
            self._leading = False
