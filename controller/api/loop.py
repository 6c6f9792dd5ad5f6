"""The closed loop's routes in one router, so the app registers them in one line:
drift, data sets and retraining under /v1; /metrics at the root. Roles are checked
by the application (:func:`controller.api.deps.authorize`)."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api import datasets, drift, monitoring, retraining

router = APIRouter()
for _module in (drift, datasets, retraining):
    router.include_router(_module.router, prefix="/v1")
router.include_router(monitoring.rollups_router, prefix="/v1")
router.include_router(monitoring.router)
