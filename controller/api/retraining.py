"""/v1/retraining: versioned policies, their runs, and the result a pipeline reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import ValidationError

from controller.api.deps import ClosedLoopDep, FleetDep, GroupsDep, RegistryDep, RolloutsDep
from controller.api.loop_schemas import PolicyCreate, PolicyPublic, RunPublic, RunResult, RunResultPublic
from controller.api.responses import errors
from controller.api.rollout_schemas import RolloutCreate, RolloutSpec
from controller.errors import InvalidInputError, InvalidPolicy, ModelNotFound, UnknownTargets
from controller.fleet import Fleet
from controller.groups import Groups
from controller.retraining import RolloutStarter
from controller.retraining_policies import POLICY_NAME, Policy
from controller.rollout_plans import validate
from controller.rollouts import Rollouts

router = APIRouter(tags=["retraining"])


def rollout_body(model: str, version: str, spec: Mapping[str, Any]) -> RolloutCreate:
    try:
        return RolloutCreate.model_validate({**spec, "model": model, "version": version})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidPolicy(f"rollout: {problems}") from None


def rollout_starter(rollouts: Rollouts) -> RolloutStarter:
    """Start a policy's rollout exactly as POST /v1/rollouts would (waves, gates: a canary)."""

    def start(model: str, version: str, spec: Mapping[str, Any]) -> str:
        body = rollout_body(model, version, spec)
        return str(rollouts.create(model, version, tenant=body.tenant, plan_=body.to_plan()).id)

    return start


def check_rollout(spec: RolloutSpec, fleet: Fleet, groups: Groups) -> None:
    """A policy's rollout as POST /v1/rollouts would check it, now rather than when the run
    reports: a plan that makes sense and devices that are registered (422 naming them)."""
    plan = spec.to_plan()
    try:
        validate(plan)
    except InvalidInputError as exc:
        raise InvalidPolicy(f"rollout: {exc}") from None
    named = list(plan.target.devices)
    known = fleet.known(named)
    missing = [d for d in named if d not in known]
    if missing:
        raise UnknownTargets(f"rollout: unknown devices: {', '.join(missing)} (see `edgefleet devices list`)")
    if plan.target.group is not None and not groups.exists(plan.target.group):
        raise UnknownTargets(f"rollout: unknown group {plan.target.group} (see `edgefleet groups list`)")


PolicyName = Annotated[str, Path(pattern=POLICY_NAME.pattern, description="the policy's name")]


def _public(policy: Policy) -> PolicyPublic:
    return PolicyPublic.model_validate(policy.public())


@router.put("/retraining/policies/{name}", response_model=PolicyPublic, responses=errors(404))
def put_policy(
    name: PolicyName,
    body: PolicyCreate,
    loop: ClosedLoopDep,
    registry: RegistryDep,
    fleet: FleetDep,
    groups: GroupsDep,
) -> PolicyPublic:
    """Create the policy, or add a version of it (the newest version is in force). Its
    rollout is checked as a rollout would be: the devices it names must be registered."""
    if body.model not in {m.name for m in registry.all()}:
        raise ModelNotFound(f"no model {body.model!r}")
    if body.rollout is not None:
        check_rollout(body.rollout, fleet, groups)
    doc = body.model_dump(exclude_none=True, exclude={"rollout"})
    if body.rollout is not None:
        # Kept as given: the defaults are applied when the rollout starts.
        doc["rollout"] = body.rollout.model_dump(exclude_unset=True)
    return _public(loop.retraining.put_policy(name, doc))


@router.get("/retraining/policies", response_model=list[PolicyPublic])
def list_policies(loop: ClosedLoopDep) -> list[PolicyPublic]:
    return [_public(p) for p in loop.retraining.policies()]


@router.get("/retraining/policies/{name}", response_model=PolicyPublic)
def get_policy(name: str, loop: ClosedLoopDep) -> PolicyPublic:
    return _public(loop.retraining.policy(name))


@router.get("/retraining/policies/{name}/versions", response_model=list[PolicyPublic])
def policy_versions(name: str, loop: ClosedLoopDep) -> list[PolicyPublic]:
    return [_public(p) for p in loop.retraining.policy_versions(name)]


@router.post("/retraining/evaluate", response_model=list[RunPublic])
def evaluate_now(loop: ClosedLoopDep) -> list[RunPublic]:
    """Evaluate every policy now instead of at the next maintenance tick."""
    return [RunPublic.model_validate(r) for r in loop.retraining.tick()]


@router.get("/retraining/runs", response_model=list[RunPublic])
def list_runs(
    loop: ClosedLoopDep, policy: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[RunPublic]:
    return [RunPublic.model_validate(r) for r in loop.retraining.runs(policy, limit)]


@router.get("/retraining/runs/{run_id}", response_model=RunPublic)
def get_run(run_id: str, loop: ClosedLoopDep) -> RunPublic:
    return RunPublic.model_validate(loop.retraining.run(run_id))


@router.post("/retraining/runs/{run_id}/result", response_model=RunResultPublic)
def report_result(
    run_id: str, body: RunResult, loop: ClosedLoopDep, registry: RegistryDep, rollouts: RolloutsDep
) -> RunResultPublic:
    """A pipeline registered a version for this run; the policy's rollout (if any) starts."""
    run = loop.retraining.run(run_id)
    registry.get(run.model_name, body.version)
    done, rollout_id = loop.retraining.complete(run_id, body.version, rollout_starter(rollouts))
    return RunResultPublic(run=RunPublic.model_validate(done), rollout_id=rollout_id)
