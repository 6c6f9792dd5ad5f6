"""Request (``...Create``) and response (``...Public``) bodies of the REST API.

Times are Unix seconds (float); ``*_ms`` fields are the device's milliseconds.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from edgefleet_proto.topics import _DEVICE_ID as DEVICE_ID
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from controller.api.bodies import Create, Public
from controller.fleet import _TAG as TAG


class TensorSpecPublic(Public):
    name: str
    dtype: str
    shape: list[int]


class LineagePublic(Public):
    parent_version: str
    dataset_digest: str
    code_version: str
    metrics: dict[str, Any]


class VariantPublic(Public):
    variant: str
    format: str
    precision: str
    source: Literal["uploaded", "quantized", "lowered"]
    status: Literal["pending", "running", "ready", "rejected", "failed"]
    progress: float
    digest: str
    size: int
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    opset: int
    runtime: str
    runtime_version: str
    latency_ms: float | None
    report: dict[str, Any]
    reason: str
    signature: str
    key_id: str
    created_at: float
    updated_at: float


class InputRoleBody(BaseModel):
    """One input: ``source`` (layout NHWC, NCHW, NC, NTC, NT or empty; batch axis, -1 none),
    ``constant`` (``value``) or ``state`` (carried from output ``from_output``, initial ``value``)."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")
    name: str
    role: str
    dtype: str
    shape: list[int]
    layout: str = ""
    batch_axis: int = -1
    value: list[float] = Field(default_factory=list)
    from_output: str = ""


class OutputMeaningBody(BaseModel):
    """One output: ``scores``, ``boxes``, ``embeddings``, ``state``, ``mask`` or empty."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")
    name: str
    meaning: str = ""
    dtype: str
    shape: list[int]


class ModelSignatureBody(BaseModel):
    """What each input and output of a model version is (read and written whole)."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")
    inputs: list[InputRoleBody]
    outputs: list[OutputMeaningBody]


class ModelVersionPublic(Public):
    name: str
    version: str
    digest: str
    size: int
    format: str
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    metadata: dict[str, Any]
    created_at: float
    lineage: LineagePublic
    stage: Literal["development", "staging", "production", "archived"]
    task: str
    sensor_kind: str
    gate: float
    calibration_digest: str
    variants: list[VariantPublic]
    signature: ModelSignatureBody
    # The sample inputs devices fetch by digest (an .npz): "uploaded" or "synthesized".
    sample_digest: str
    sample_size: int
    sample_count: int
    sample_origin: str


class StageChange(Create):
    stage: Literal["development", "staging", "production", "archived"]


class VersionSummaryPublic(Public):
    version: str
    digest: str
    size: int
    created_at: float
    stage: str


class ModelPublic(Public):
    name: str
    versions: list[VersionSummaryPublic]


# Devices one POST /v1/device-batches registers at most (its answer holds a password for each).
MAX_DEVICE_BATCH = 10_000


class DeviceCreate(Create):
    device_id: str = Field(pattern=DEVICE_ID.pattern)
    tags: list[Annotated[str, Field(pattern=TAG.pattern)]] = Field(default_factory=list)
    profile: str = ""


class DeviceBatchCreate(Create):
    # uniqueItems: the document says a batch lists each device once (one listed twice is a 422).
    devices: list[DeviceCreate] = Field(
        min_length=1, max_length=MAX_DEVICE_BATCH, json_schema_extra={"uniqueItems": True}
    )


class DeviceCredentialsPublic(Public):
    device_id: str
    mqtt_username: str
    mqtt_password: str
    broker_host: str
    broker_port: int
    mqtt_protocol: str
    controller_public_key: str
    profile: str
    broker_ca_pem: str = Field(
        default="",
        description="The CA the broker's TLS certificate is verified with, for the device; empty in plain TCP",
    )


class DeviceCertificateCreate(Create):
    # The device's public key (PEM, EC P-256/P-384 or RSA >= 2048 bits); its private key
    # stays with whoever made the pair (the operator's CLI).
    public_key_pem: str = Field(max_length=16384)
    valid_days: int = Field(default=730, ge=1, le=3650)


class DeviceRevokeCreate(Create):
    reason: str = Field("", max_length=1000, description="Why, kept with the revocation")


class DeviceRevokedPublic(Public):
    device_id: str
    revoked_at: float
    reason: str
    certificates_revoked: list[str] = Field(description="Hex serials now on the CA's revocation list")
    session_ended: bool = Field(description="Whether the broker ended the session the device held")


class DeviceCertificatePublic(Public):
    device_id: str
    serial: str
    # Its common name is the device id: the MQTT username a broker with
    # use_identity_as_username takes from it.
    certificate_pem: str
    not_after: float
    # The controller's CA, which the broker's TLS listener checks client certificates with.
    ca_pem: str
    # The CA the broker's own certificate is verified with (the controller's
    # mqtt_tls_ca_file); empty when the controller talks to its broker in plain TCP.
    broker_ca_pem: str


class ModelStatePublic(Public):
    tenant: str
    model_name: str
    model_version: str
    artifact_digest: str
    phase: str
    bytes_have: int
    bytes_total: int
    error: str
    rollout_id: str


class ConditionPublic(Public):
    kind: str = Field(description='e.g. "disk_full", "desired_refused"')
    message: str = Field(description="What it stops, in words an operator can act on")
    since_ms: int = Field(description="When it began (ms since the epoch)")
    count: int = Field(description="How many times it was hit since it began")


class ReportedPublic(Public):
    desired_generation: int
    applied_generation: int
    models: list[ModelStatePublic]
    agent_version: str
    reported_at_ms: int
    conditions: list[ConditionPublic] = Field(
        default_factory=list, description="What keeps the device from its work, e.g. a full disk"
    )


class OutboxLossesPublic(Public):
    """Records the device's agent could not deliver, totalled over its restarts (at least these)."""

    dropped_at_bound: int = Field(description="Telemetry records its outbox bound dropped")
    dropped_for_space: int = Field(description="Telemetry windows dropped, oldest first, on a full disk")
    unwritable: int = Field(description="Records (telemetry, events, captures) a failed write never stored")
    seq: int = Field(description="The newest telemetry window counted")
    window_end_ms: int = Field(description="When that window ended, by the device's clock")
    updated_at: float


class DevicePublic(Public):
    device_id: str
    tags: list[str]
    online: bool
    last_seen: float | None
    agent_version: str
    desired_generation: int
    reported: ReportedPublic | None
    created_at: float
    profile: str
    outbox_losses: OutboxLossesPublic | None = Field(
        None, description="What the device's agent could not deliver; null while it lost nothing"
    )
    revoked_at: float | None = Field(
        None, description="When the device was revoked (its certificates and password refused); null if not"
    )


class TenantSourceCreate(Create):
    kind: str
    uri: str = ""
    # Kind-specific options as in agent.toml's [tenants.source] (loop, fps, delimiter, ...).
    options: dict[str, str | int | float | bool] = {}


class TenantCreate(Create):
    """A tenant app as agent.toml's [[tenants]] declares it; ``token`` is hashed on arrival."""

    id: str
    model: str = ""
    source: TenantSourceCreate | None = None
    preprocess: dict[str, str | int | float | bool | list[int] | list[float]] = {}
    rate_hz: float = 0.0
    weight: float = 1.0
    queue: int = 4
    results: list[str] = ["grpc"]
    token: str = ""
    token_sha256: str = ""
    # As agent.toml's [tenants.postprocess] and [tenants.inputs.NAME] tables; checked against
    # the signature of the model's newest version.
    postprocess: dict[str, str | int | float | bool | list[int] | list[float] | list[str]] = {}
    inputs: dict[str, dict[str, str | int | float | list[int] | list[float]]] = {}


class TenantSourcePublic(Public):
    kind: str
    uri: str
    options: dict[str, str]


class TenantPublic(Public):
    """A declared tenant; its token is a secret and never shown (``has_token`` says whether one is set)."""

    id: str
    model: str
    source: TenantSourcePublic | None
    preprocess: dict[str, str]
    rate_hz: float
    weight: float
    queue: int
    results: list[str]
    has_token: bool
    postprocess: dict[str, str]
    inputs: list[dict[str, Any]]


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# A number a device reported: null when what it reported is not finite (NaN, infinity),
# as JSON has no such numbers.
Reported = Annotated[float | None, BeforeValidator(_finite_or_none)]


class SystemStatsPublic(Public):
    cpu_percent: Reported
    mem_total_bytes: int
    mem_used_bytes: int
    mem_percent: Reported
    disk_total_bytes: int
    disk_used_bytes: int
    disk_percent: Reported
    temperature_c: Reported
    load1: Reported


class ModelStatsPublic(Public):
    tenant: str
    model_name: str
    model_version: str
    inference_count: int
    error_count: int
    latency_p50_ms: Reported
    latency_p95_ms: Reported
    latency_p99_ms: Reported
    # What fed them (counted like inference_count and error_count); 0 in windows stored before
    # the agents reported it.
    pipeline_inferences: int = 0
    pipeline_errors: int = 0
    grpc_inferences: int = 0
    grpc_errors: int = 0
    shadow_inferences: int = 0
    shadow_errors: int = 0


class ShadowStatsPublic(Public):
    """A shadow candidate beside a tenant's live model in one window."""

    tenant: str
    live_model_version: str
    candidate_model_name: str
    candidate_model_version: str
    compared: int
    top1_agreement: Reported
    mean_abs_deviation: Reported
    candidate_latency_p50_ms: Reported
    candidate_latency_p95_ms: Reported
    live_latency_p50_ms: Reported


class TenantStatsPublic(Public):
    """One tenant pipeline in one window."""

    tenant: str
    samples: int
    inferences: int
    dropped: int
    errors: int
    rate_hz: Reported
    latency_p50_ms: Reported
    latency_p95_ms: Reported
    latency_p99_ms: Reported
    source_failures: int
    weight: Reported
    busy_s: Reported


class TelemetryPublic(Public):
    received_at: float
    window_start_ms: int
    window_end_ms: int
    seq: int
    system: SystemStatsPublic
    models: list[ModelStatsPublic]
    outbox_dropped: int
    shadows: list[ShadowStatsPublic] = []
    tenants: list[TenantStatsPublic] = []


class EventPublic(Public):
    received_at: float
    at_ms: int
    kind: str
    severity: str
    message: str
    attributes: dict[str, str]


class ProfileCreate(Create):
    source: str = Field(description="The profile's TOML text")
    filename: str = Field("", description="The file it came from; its stem must equal the profile's id")


class ProfilePublic(Public):
    id: str
    doc: dict[str, Any]
    source: str
    created_at: float
    updated_at: float


class DeviceProfileSet(Create):
    profile: str


class SigningKeyPublic(Public):
    key_id: str
    public_key: str
    previous_key_id: str


class RolloutTargetPublic(Public):
    device_id: str
    profile: str
    variant: str
    digest: str
    skipped: str
