"""/v1/rollouts: send a model version to a target in waves, follow it, steer it."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, status

from controller.api.deps import RolloutsDep
from controller.api.responses import errors
from controller.api.rollout_schemas import (
    RolloutCommandIn,
    RolloutCreate,
    RolloutEventPublic,
    RolloutPublic,
)
from controller.rollout_engine import Command

router = APIRouter(tags=["rollouts"])


@router.post(
    "/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutPublic, responses=errors(409)
)
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


_COMMANDS = {
    Command.PAUSE: "Pause the rollout where it is.",
    Command.RESUME: "Resume a paused rollout.",
    Command.APPROVE: "Approve the next wave of a rollout waiting for manual approval.",
    Command.ABORT: "Stop the rollout; devices keep what they have.",
    Command.ROLLBACK: "Send every device the rollout reached back to its previous version.",
    Command.PROMOTE: "Skip the current wave's soak and go on.",
}


@router.post(
    "/rollouts/{rollout_id}/retry-failed",
    response_model=RolloutPublic,
    responses=errors(409),
    summary="Send the version again to the devices whose update failed, and only to them.",
)
def retry_failed(
    rollout_id: str, rollouts: RolloutsDep, body: RolloutCommandIn | None = None
) -> RolloutPublic:
    """A paused or failed rollout runs again; refused (409) when no device failed."""
    note = body.reason if body is not None else ""
    return RolloutPublic.model_validate(rollouts.retry_failed(rollout_id, note))


def _command_route(command: Command) -> Callable[..., RolloutPublic]:
    def run(rollout_id: str, rollouts: RolloutsDep, body: RolloutCommandIn | None = None) -> RolloutPublic:
        note = body.reason if body is not None else ""
        return RolloutPublic.model_validate(rollouts.command(rollout_id, command, note))

    return run


# One operation per command, so the API document lists each (and /events, /variants
# stay read-only paths rather than commands that do not exist).
for _command, _summary in _COMMANDS.items():
    router.add_api_route(
        f"/rollouts/{{rollout_id}}/{_command.value}",
        _command_route(_command),
        methods=["POST"],
        response_model=RolloutPublic,
        responses=errors(409),
        name=f"rollout_{_command.value}",
        summary=_summary,
    )
