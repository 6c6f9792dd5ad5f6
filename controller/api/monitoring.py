"""/metrics (Prometheus) and /v1/telemetry/rollups.

/metrics sits outside /v1, where Prometheus looks by default. Its minimum role is
``metrics``: besides any operator token, it takes the scrape token whose hash is
``metrics_token_sha256`` in controller.toml, since Prometheus keeps its token in a config
file and a token there must not be able to change the fleet.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from controller import metrics
from controller.api.deps import ClosedLoopDep, ControllerDep, minimum_role
from controller.auth import Role

router = APIRouter(tags=["monitoring"])
rollups_router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics", response_class=Response, include_in_schema=False, openapi_extra=minimum_role(Role.METRICS)
)
def prometheus_metrics(controller: ControllerDep) -> Response:
    loop = controller.closed_loop
    sources = metrics.Sources(
        store=controller.store,
        rollups=loop.rollups,
        baselines=loop.baselines,
        rollouts=controller.rollouts.all,
        clock=loop.clock,
    )
    return Response(metrics.render(sources), media_type=metrics.CONTENT_TYPE)


@rollups_router.get("/telemetry/rollups")
def telemetry_rollups(
    loop: ClosedLoopDep,
    device: str | None = None,
    model: str | None = None,
    since_ms: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict[str, Any]]:
    """Roll-up buckets (``rollup_window_s`` each) per device and model version, newest first."""
    return loop.rollups.query(device, model, since_ms, limit)
