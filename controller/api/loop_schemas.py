"""Request and response bodies of the closed-loop routes: drift, data sets, retraining."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from controller.api.bodies import Create, Public
from controller.api.rollout_schemas import RolloutSpec
from controller.capture_policies import DEFAULT_BOUNDS
from controller.retraining import Run


class ReferenceData(Create):
    inputs: list[Any]
    probabilities: list[list[float]] | None = None


class SpecBody(Create):
    features: dict[str, list[float]]
    confidence_edges: list[float] | None = None
    num_classes: int = 0


class ProductionBaseline(Create):
    windows: int = Field(ge=1)
    spec: SpecBody


class BaselineCreate(Create):
    """Exactly one of: reference inputs inline, a stored data set as reference, or the first N production windows."""

    reference: ReferenceData | None = None
    dataset: str | None = None
    production: ProductionBaseline | None = None
    bins: int = Field(default=10, ge=2, le=100)


class BaselinePublic(Public):
    model_name: str
    model_version: str
    source: str
    windows_needed: int
    ready: bool
    samples: int
    spec: dict[str, Any]
    created_at: float


class DriftPublic(Public):
    model_name: str
    model_version: str
    baseline: BaselinePublic
    bucket_s: int
    fleet: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]


class ManifestPublic(Public):
    device_id: str
    tenant: str
    model_name: str
    model_version: str
    policy_id: str
    start_ms: int
    end_ms: int
    reasons: dict[str, int]


class DatasetPublic(Public):
    digest: str
    size: int
    samples: int
    manifest: ManifestPublic
    labelled: bool
    labels_digest: str
    created_at: float


class LabelsBody(Create):
    labels: list[int]


# The domain's run, field for field (no docstring: its schema stays without a description).
class RunPublic(Run, Public):
    pass


class RunResult(Create):
    version: str


class RunResultPublic(Public):
    run: RunPublic
    rollout_id: str


# -- retraining policies --------------------------------------------------------------


class DriftConditionIn(Create):
    threshold: float = Field(ge=0, description="PSI or KL above which a fleet-wide window counts as drifted")
    windows: int = Field(3, ge=1, description="consecutive drifted windows that trigger")
    metric: Literal["psi", "kl"] = "psi"


class AccuracyConditionIn(Create):
    below: float = Field(ge=0, le=1, description="trigger when labelled accuracy falls below this fraction")
    min_samples: int = Field(20, ge=1)


class ScheduleConditionIn(Create):
    every_s: float = Field(ge=1)


def _at_least_one_condition(schema: dict[str, Any]) -> None:
    # What the validator below enforces, said in the schema: a condition is an object
    # (null is only the default of one left out) and at least one is given.
    schema["minProperties"] = 1
    for prop in schema["properties"].values():
        prop["anyOf"] = [s for s in prop.get("anyOf", []) if s.get("type") != "null"]
        prop.pop("default", None)


class ConditionsIn(Create):
    """At least one of drift, accuracy, schedule."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_at_least_one_condition)

    drift: DriftConditionIn | None = None
    accuracy: AccuracyConditionIn | None = None
    schedule: ScheduleConditionIn | None = None

    @model_validator(mode="before")
    @classmethod
    def _objects_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)}: a condition must be an object; leave it out instead")
            if not data:
                raise ValueError("conditions must hold at least one of drift, accuracy, schedule")
        return data


class WebhookTriggerIn(Create):
    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://\S+$")
    secret: str = Field(min_length=16, description="HMAC key the webhook's body is signed with")
    timeout_s: float = Field(10.0, ge=0.1)
    max_attempts: int = Field(5, ge=1)


class CommandTriggerIn(Create):
    kind: Literal["command"]
    command: list[str] = Field(min_length=1, description="argv, run without a shell")
    timeout_s: float = Field(10.0, ge=0.1)
    max_attempts: int = Field(5, ge=1)


class PolicyCreate(Create):
    """A retraining policy: when to trigger (conditions, cooldown), how (trigger), and how to
    roll out the version the triggered run registers (rollout)."""

    model: str = Field(min_length=1)
    conditions: ConditionsIn
    trigger: Annotated[WebhookTriggerIn | CommandTriggerIn, Field(discriminator="kind")]
    cooldown_s: float = Field(3600.0, ge=0)
    enabled: bool = True
    rollout: RolloutSpec | None = None


class TriggerPublic(Public):
    kind: Literal["webhook", "command"]
    url: str = ""
    command: list[str] = []
    timeout_s: float
    max_attempts: int
    secret_set: bool


class PolicyPublic(Public):
    name: str
    version: int
    model: str
    conditions: dict[str, dict[str, Any]]
    trigger: TriggerPublic
    cooldown_s: float
    enabled: bool
    rollout: dict[str, Any] | None = None


# -- capture policies ------------------------------------------------------------------


class CapturePolicyCreate(Create):
    """What a model's tenants capture for retraining; at least one fraction above 0."""

    random_fraction: float = Field(0.0, ge=0, le=1)
    low_confidence_below: float = Field(0.0, ge=0, le=1)
    drifted_feature_share: float = Field(0.0, ge=0, le=1)
    max_samples_per_hour: int = Field(DEFAULT_BOUNDS["max_samples_per_hour"], ge=0)
    max_samples_per_upload: int = Field(DEFAULT_BOUNDS["max_samples_per_upload"], ge=0)
    max_bytes_per_upload: int = Field(DEFAULT_BOUNDS["max_bytes_per_upload"], ge=0)


class CapturePolicyPublic(Public):
    model_name: str
    tenant: str
    version: int
    policy_id: str
    random_fraction: float
    low_confidence_below: float
    drifted_feature_share: float
    max_samples_per_hour: int
    max_samples_per_upload: int
    max_bytes_per_upload: int
    updated_at: float
