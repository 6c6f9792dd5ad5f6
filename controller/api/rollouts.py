"""/v1/rollouts: send a model version to devices and follow it."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import RolloutsDep
from controller.api.schemas import RolloutCreate, RolloutPublic

router = APIRouter(tags=["rollouts"])


@router.post("/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutPublic)
def create_rollout(body: RolloutCreate, rollouts: RolloutsDep) -> RolloutPublic:
    created = rollouts.create(body.model, body.version, body.devices, body.tenant)
    return RolloutPublic.model_validate(created)


@router.get("/rollouts", response_model=list[RolloutPublic])
def list_rollouts(rollouts: RolloutsDep) -> list[RolloutPublic]:
    return [RolloutPublic.model_validate(r) for r in rollouts.all()]


@router.get("/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, rollouts: RolloutsDep) -> RolloutPublic:
    return RolloutPublic.model_validate(rollouts.get(rollout_id))
