"""/v1/models: upload and list model versions."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, UploadFile, status

from controller.api.deps import RegistryDep
from controller.api.schemas import ModelPublic, ModelVersionPublic
from controller.errors import InvalidInputError

router = APIRouter(tags=["models"])


def parse_metadata(raw: str) -> dict[str, Any]:
    try:
        metadata = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"metadata is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise InvalidInputError("metadata must be a JSON object")
    return metadata


@router.post(
    "/models/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=ModelVersionPublic
)
def upload_version(
    name: str,
    file: UploadFile,
    version: Annotated[str, Form()],
    registry: RegistryDep,
    metadata: Annotated[str, Form()] = "{}",
) -> ModelVersionPublic:
    created = registry.upload(name, version, file.file, parse_metadata(metadata))
    return ModelVersionPublic.model_validate(created)


@router.get("/models", response_model=list[ModelPublic])
def list_models(registry: RegistryDep) -> list[ModelPublic]:
    return [ModelPublic.model_validate(m) for m in registry.all()]


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_version(name: str, version: str, registry: RegistryDep) -> ModelVersionPublic:
    return ModelVersionPublic.model_validate(registry.get(name, version))
