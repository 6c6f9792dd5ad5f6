"""The closed loop's routes in one router, so the app registers them in one line:
drift, data sets and retraining under /v1 behind the admin token; /metrics at
the root with its own token check."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from controller.api import datasets, drift, monitoring, retraining
from controller.api.deps import require_token

router = APIRouter()
for _module in (drift, datasets, retraining):
    router.include_router(_module.router, prefix="/v1", dependencies=[Depends(require_token)])
router.include_router(monitoring.rollups_router, prefix="/v1")
router.include_router(monitoring.router)
