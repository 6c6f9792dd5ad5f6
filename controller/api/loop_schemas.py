"""Request and response bodies of the closed-loop routes: drift, data sets, retraining."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Create(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ReferenceData(_Create):
    inputs: list[Any]
    probabilities: list[list[float]] | None = None


class SpecBody(_Create):
    features: dict[str, list[float]]
    confidence_edges: list[float] | None = None
    num_classes: int = 0


class ProductionBaseline(_Create):
    windows: int = Field(ge=1)
    spec: SpecBody


class BaselineCreate(_Create):
    """Exactly one of: reference inputs inline, a stored data set as reference, or the first N production windows."""

    reference: ReferenceData | None = None
    dataset: str | None = None
    production: ProductionBaseline | None = None
    bins: int = Field(default=10, ge=2, le=100)


class BaselinePublic(_Public):
    model_name: str
    model_version: str
    source: str
    windows_needed: int
    ready: bool
    samples: int
    spec: dict[str, Any]
    created_at: float


class DriftPublic(_Public):
    model_name: str
    model_version: str
    baseline: BaselinePublic
    bucket_s: int
    fleet: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]


class ManifestPublic(_Public):
    device_id: str
    tenant: str
    model_name: str
    model_version: str
    policy_id: str
    start_ms: int
    end_ms: int
    reasons: dict[str, int]


class DatasetPublic(_Public):
    digest: str
    size: int
    samples: int
    manifest: ManifestPublic
    labelled: bool
    labels_digest: str
    created_at: float


class LabelsBody(_Create):
    labels: list[int]


class RunPublic(_Public):
    id: str
    policy_name: str
    policy_version: int
    model_name: str
    model_version: str
    fired: list[dict[str, Any]]
    datasets: list[str]
    status: str
    detail: str
    attempts: int
    result_version: str
    created_at: float
    updated_at: float


class RunResult(_Create):
    version: str


class RunResultPublic(_Public):
    run: RunPublic
    rollout_id: str
