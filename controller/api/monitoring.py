"""/metrics (Prometheus) and /v1/telemetry/rollups.

/metrics sits outside /v1, where Prometheus looks by default. It takes the
admin bearer token or, when ``metrics_token_sha256`` is set in controller.toml,
a separate scrape token: Prometheus keeps its token in a config file, and a
read-only token there cannot change the fleet.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller import metrics
from controller.api.deps import ClosedLoopDep, ControllerDep, require_token
from controller.auth import token_matches

_bearer = HTTPBearer(auto_error=False, description="Admin token or the metrics scrape token")

router = APIRouter(tags=["monitoring"])
rollups_router = APIRouter(tags=["monitoring"], dependencies=[Depends(require_token)])


def require_scrape_token(
    controller: ControllerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = credentials.credentials if credentials else ""
    scrape = controller.settings.metrics_token_sha256
    if token and (
        token_matches(token, controller.admin_token_hash()) or (scrape and token_matches(token, scrape))
    ):
        return
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid bearer token",
        headers={"WWW-Authenticate": "Bearer"},
    )


@router.get(
    "/metrics", response_class=Response, dependencies=[Depends(require_scrape_token)], include_in_schema=False
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
