"""Pipeline jobs of a tenant removed under them: dropped, not inference errors. No broker."""

from __future__ import annotations

import time

import numpy as np

from agent.pipeline import Job, Pipelines, ResultHub
from agent.pool import ModelPool
from agent.preprocess import Prepared
from agent.telemetry import PipelineStats
from agent.tenants import TenantSpec


def job() -> Job:
    return Job(Prepared(np.zeros((1, 4), np.float32), 0, 0), 0, time.perf_counter())


def test_a_job_taken_before_its_tenant_was_removed_counts_as_dropped_not_an_error() -> None:
    removing = True

    def clock() -> float:
        # The scheduler reads its cost clock after taking a job and before running it: the
        # tenant goes away exactly there, the race a worker can lose to apply().
        nonlocal removing
        if removing:
            removing = False
            pipelines.apply(())
        return time.perf_counter()

    pipelines = Pipelines(
        "dev-1",
        ModelPool(threads=1),
        1,
        PipelineStats(),
        lambda *a: None,
        lambda *a: None,
        ResultHub(),
        cost_clock=clock,
    )
    pipelines.apply((TenantSpec("app"),))
    pipelines.submit("app", job())
    pipelines.start()
    assert pipelines.scheduler.stop(10)

    assert not removing, "the tenant was removed while its job was in flight"
    tenants, _ = pipelines.stats.drain(*pipelines.telemetry_inputs())
    [app] = [t for t in tenants if t.tenant == "app"]
    assert (app.dropped, app.errors, app.inferences) == (1, 0, 0)


def test_jobs_still_queued_when_their_tenant_is_removed_count_as_dropped() -> None:
    pipelines = Pipelines(
        "dev-1", ModelPool(threads=1), 1, PipelineStats(), lambda *a: None, lambda *a: None, ResultHub()
    )
    pipelines.apply((TenantSpec("app", queue=4),))
    for _ in range(3):
        pipelines.submit("app", job())
    pipelines.apply(())
    pipelines.start()
    assert pipelines.scheduler.stop(10)

    tenants, _ = pipelines.stats.drain(*pipelines.telemetry_inputs())
    [app] = [t for t in tenants if t.tenant == "app"]
    assert (app.dropped, app.errors, app.inferences) == (3, 0, 0)
