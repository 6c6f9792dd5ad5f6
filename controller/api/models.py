"""/v1/models: upload versions and variants, inspect, change stages, compare."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, UploadFile, status
from pydantic import ValidationError

from controller.api.deps import RegistryDep
from controller.api.responses import errors
from controller.api.schemas import (
    ModelPublic,
    ModelSignatureBody,
    ModelVersionPublic,
    StageChange,
    VariantPublic,
)
from controller.errors import InvalidInputError
from controller.registry import DEFAULT_GATE, NAME_PATTERN, Lineage, UploadOptions
from controller.signature import ModelSignature

router = APIRouter(tags=["models"])

ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]


def parse_signature(raw: str) -> ModelSignature | None:
    """The signature form field of an upload (JSON, as GET .../signature returns it), or None."""
    if not raw.strip():
        return None
    try:
        body = ModelSignatureBody.model_validate(parse_metadata(raw, "signature"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"signature.{where}: {first['msg']}") from None
    return ModelSignature.from_json(body.model_dump())


def parse_metadata(raw: str, what: str = "metadata") -> dict[str, Any]:
    try:
        metadata = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return metadata


@router.post(
    "/models/{name}/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelVersionPublic,
    responses=errors(409),
)
def upload_version(
    name: ModelName,
    file: UploadFile,
    version: Annotated[str, Form(pattern=NAME_PATTERN)],
    registry: RegistryDep,
    metadata: Annotated[str, Form()] = "{}",
    parent_version: Annotated[str, Form()] = "",
    dataset_digest: Annotated[str, Form()] = "",
    code_version: Annotated[str, Form()] = "",
    metrics: Annotated[str, Form()] = "{}",
    task: Annotated[str, Form()] = "",
    sensor: Annotated[str, Form()] = "",
    gate: Annotated[float, Form()] = DEFAULT_GATE,
    dynamic: Annotated[bool, Form()] = False,
    fp16: Annotated[bool, Form()] = False,
    calibration: UploadFile | None = None,
    samples: UploadFile | None = None,
    signature: Annotated[str, Form()] = "",
) -> ModelVersionPublic:
    """Register a version; with a calibration set (.npz of named inputs) int8 variants are
    produced in the background: this call returns at once with them ``pending``.

    ``samples`` (.npz of named inputs in the model's own shapes) travel with the version
    (staging smoke test, validation, calibration when no calibration set is given); without
    them one is synthesized from the signature. The model must run on the first sample.
    ``signature`` (JSON) replaces the signature inferred from the model."""
    options = UploadOptions(
        lineage=Lineage(parent_version, dataset_digest, code_version, parse_metadata(metrics, "metrics")),
        task=task,
        sensor_kind=sensor,
        gate=gate,
        dynamic=dynamic,
        fp16=fp16,
    )
    created = registry.upload(
        name,
        version,
        file.file,
        parse_metadata(metadata),
        options,
        calibration.file if calibration is not None else None,
        samples.file if samples is not None else None,
        parse_signature(signature),
    )
    return ModelVersionPublic.model_validate(created)


@router.get("/models", response_model=list[ModelPublic])
def list_models(registry: RegistryDep) -> list[ModelPublic]:
    return [ModelPublic.model_validate(m) for m in registry.all()]


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_version(name: str, version: str, registry: RegistryDep) -> ModelVersionPublic:
    return ModelVersionPublic.model_validate(registry.get(name, version))


@router.get("/models/{name}/versions/{version}/signature", response_model=ModelSignatureBody)
def get_signature(name: str, version: str, registry: RegistryDep) -> ModelSignatureBody:
    return ModelSignatureBody.model_validate(registry.get(name, version).signature)


@router.put("/models/{name}/versions/{version}/signature", response_model=ModelSignatureBody)
def put_signature(
    name: str, version: str, body: ModelSignatureBody, registry: RegistryDep
) -> ModelSignatureBody:
    """Replace the signature; refused (422, nothing stored) when it contradicts the model or
    its sample inputs, or when a sample synthesized from it does not run."""
    changed = registry.set_signature(name, version, ModelSignature.from_json(body.model_dump()))
    return ModelSignatureBody.model_validate(changed.signature)


@router.post(
    "/models/{name}/versions/{version}/variants",
    status_code=status.HTTP_201_CREATED,
    response_model=VariantPublic,
    responses=errors(409),
)
def upload_variant(name: str, version: str, file: UploadFile, registry: RegistryDep) -> VariantPublic:
    """Another artifact of the version, e.g. a float or int8 .tflite export."""
    return VariantPublic.model_validate(registry.add_variant(name, version, file.file))


@router.post("/models/{name}/versions/{version}/stage", response_model=ModelVersionPublic)
def change_stage(name: str, version: str, body: StageChange, registry: RegistryDep) -> ModelVersionPublic:
    return ModelVersionPublic.model_validate(registry.set_stage(name, version, body.stage))


@router.get("/models/{name}/compare")
def compare(name: str, a: str, b: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.compare(name, a, b)
