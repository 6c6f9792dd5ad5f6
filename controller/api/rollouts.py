"""/v1/rollouts: send a model version to a target in waves, follow it, steer it."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import RolloutsDep
from controller.api.rollout_schemas import (
    RolloutCommandIn,
    RolloutCreate,
    RolloutEventPublic,
    RolloutPublic,
)
from controller.rollout_engine import Command

router = APIRouter(tags=["rollouts"])


@router.post("/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutPublic)
def create_rollout(body: RolloutCreate, rollouts: RolloutsDep) -> RolloutPublic:
    created = rollouts.create(body.model, body.version, tenant=body.tenant, plan_=body.to_plan())
    return RolloutPublic.model_validate(created)


@router.get("/rollouts", response_model=list[RolloutPublic])
def list_rollouts(rollouts: RolloutsDep) -> list[RolloutPublic]:
    return [RolloutPublic.model_validate(r) for r in rollouts.all()]


@router.get("/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, rollouts: RolloutsDep) -> RolloutPublic:
    return RolloutPublic.model_validate(rollouts.get(rollout_id))


@router.get("/rollouts/{rollout_id}/events", response_model=list[RolloutEventPublic])
def rollout_events(rollout_id: str, rollouts: RolloutsDep) -> list[RolloutEventPublic]:
    """Every transition of the rollout and its reason, oldest first."""
    return [RolloutEventPublic.model_validate(e) for e in rollouts.events(rollout_id)]


@router.post("/rollouts/{rollout_id}/{command}", response_model=RolloutPublic)
def rollout_command(
    rollout_id: str, command: Command, rollouts: RolloutsDep, body: RolloutCommandIn | None = None
) -> RolloutPublic:
    """pause, resume, approve (the next wave), abort, rollback, promote (skip the current wave's soak)."""
    note = body.reason if body is not None else ""
    return RolloutPublic.model_validate(rollouts.command(rollout_id, command, note))
