"""/v1/datasets: captured (or operator-uploaded) data sets, their download and labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile, status
from fastapi.responses import Response

from controller.api.deps import ClosedLoopDep, RegistryDep
from controller.api.loop_schemas import CapturePolicyCreate, CapturePolicyPublic, DatasetPublic, LabelsBody
from controller.datasets import MAX_DATASET_BYTES, Manifest
from controller.errors import InvalidDataset, ModelNotFound
from controller.registry import NAME_PATTERN

router = APIRouter(tags=["datasets"])


@router.post("/datasets", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic)
def upload_dataset(
    file: UploadFile,
    model: Annotated[str, Form(pattern=NAME_PATTERN)],
    version: Annotated[str, Form(pattern=NAME_PATTERN)],
    loop: ClosedLoopDep,
    device_id: Annotated[str, Form()] = "operator",
    tenant: Annotated[str, Form()] = "default",
    policy_id: Annotated[str, Form()] = "upload",
    start_ms: Annotated[int, Form()] = 0,
    end_ms: Annotated[int, Form()] = 0,
) -> DatasetPublic:
    data = file.file.read(MAX_DATASET_BYTES + 1)
    if len(data) > MAX_DATASET_BYTES:
        raise InvalidDataset(f"a data set may not exceed {MAX_DATASET_BYTES} bytes")
    manifest = Manifest(device_id, tenant, model, version, policy_id, start_ms, end_ms, {})
    return DatasetPublic.model_validate(loop.datasets.add(data, manifest))


@router.get("/datasets", response_model=list[DatasetPublic])
def list_datasets(
    loop: ClosedLoopDep, model: str | None = None, version: str | None = None
) -> list[DatasetPublic]:
    return [DatasetPublic.model_validate(d) for d in loop.datasets.find(model, version)]


@router.get("/datasets/{digest}", response_model=DatasetPublic)
def get_dataset(digest: str, loop: ClosedLoopDep) -> DatasetPublic:
    return DatasetPublic.model_validate(loop.datasets.get(digest))


@router.get("/datasets/{digest}/download", response_class=Response)
def download_dataset(digest: str, loop: ClosedLoopDep) -> Response:
    return Response(
        loop.datasets.read(digest),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{digest}.npz"'},
    )


@router.put("/datasets/{digest}/labels", response_model=DatasetPublic)
def put_labels(digest: str, body: LabelsBody, loop: ClosedLoopDep) -> DatasetPublic:
    return DatasetPublic.model_validate(loop.datasets.set_labels(digest, body.labels))


@router.get("/datasets/{digest}/labels")
def get_labels(digest: str, loop: ClosedLoopDep) -> dict[str, list[int] | None]:
    return {"labels": loop.datasets.labels(digest)}


@router.put("/models/{name}/capture-policy", response_model=CapturePolicyPublic)
def put_capture_policy(
    name: str,
    body: CapturePolicyCreate,
    loop: ClosedLoopDep,
    registry: RegistryDep,
    tenant: str = "default",
) -> CapturePolicyPublic:
    """What the model's tenants capture; devices get it in their desired state at the next maintenance tick."""
    if name not in {m.name for m in registry.all()}:
        raise ModelNotFound(f"no model {name!r}")
    return CapturePolicyPublic.model_validate(loop.desired.put(name, tenant, body.model_dump()))


@router.get("/models/{name}/capture-policy", response_model=CapturePolicyPublic)
def get_capture_policy(name: str, loop: ClosedLoopDep, tenant: str = "default") -> CapturePolicyPublic:
    return CapturePolicyPublic.model_validate(loop.desired.get(name, tenant))
