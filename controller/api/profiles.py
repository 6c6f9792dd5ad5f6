"""/v1/profiles: register and update device classes; /v1/devices/{id}/profile: put a device in one."""

from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter, Response, status

from controller.api.deps import FleetDep, ProfilesDep
from controller.api.schemas import (
    DeviceProfileSet,
    DevicePublic,
    ProfileCreate,
    ProfilePublic,
    RolloutTargetPublic,
)

router = APIRouter(tags=["profiles"])


@router.post("/profiles", response_model=ProfilePublic, status_code=status.HTTP_201_CREATED)
def register_profile(body: ProfileCreate, profiles: ProfilesDep, response: Response) -> ProfilePublic:
    """Create a profile (201) or replace the one with the same id (200); 422 lists every
    schema problem as ``FILE:LINE: field: problem``."""
    expected = PurePath(body.filename).stem if body.filename else None
    profile, created = profiles.register(body.source, body.filename or "profile.toml", expected)
    if not created:
        response.status_code = status.HTTP_200_OK
    return ProfilePublic.model_validate(profile)


@router.get("/profiles", response_model=list[ProfilePublic])
def list_profiles(profiles: ProfilesDep) -> list[ProfilePublic]:
    return [ProfilePublic.model_validate(p) for p in profiles.all()]


@router.get("/profiles/{profile_id}", response_model=ProfilePublic)
def get_profile(profile_id: str, profiles: ProfilesDep) -> ProfilePublic:
    return ProfilePublic.model_validate(profiles.get(profile_id))


@router.put("/devices/{device_id}/profile", response_model=DevicePublic)
def set_device_profile(
    device_id: str, body: DeviceProfileSet, profiles: ProfilesDep, fleet: FleetDep
) -> DevicePublic:
    profiles.assign(device_id, body.profile)
    return DevicePublic.model_validate(fleet.get(device_id))


@router.get("/rollouts/{rollout_id}/variants", response_model=list[RolloutTargetPublic])
def rollout_variants(rollout_id: str, profiles: ProfilesDep) -> list[RolloutTargetPublic]:
    """Which variant each targeted device was sent, or why it was sent nothing."""
    return [RolloutTargetPublic.model_validate(t) for t in profiles.rollout_targets(rollout_id)]
