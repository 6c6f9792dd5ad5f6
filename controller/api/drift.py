"""/v1/models/{name}/versions/{version}/drift: baselines and PSI/KL per device and fleet-wide."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query
from google.protobuf.json_format import MessageToDict

from controller.api.deps import ClosedLoopDep, FleetDep, RegistryDep
from controller.api.loop_schemas import BaselineCreate, BaselinePublic, DriftPublic
from controller.baselines import Baseline, sketch_layout, spec_message
from controller.drift import CONFIDENCE_EDGES, SketchSpec
from controller.errors import InvalidDriftInput

router = APIRouter(tags=["drift"])

SinceMs = Annotated[int, Query(ge=0, description="only windows ending after this (device ms)")]


def baseline_public(b: Baseline) -> BaselinePublic:
    return BaselinePublic(
        model_name=b.model_name,
        model_version=b.model_version,
        source=b.source,
        windows_needed=b.windows_needed,
        ready=b.ready,
        samples=b.sketch.samples if b.sketch else 0,
        spec=b.spec.to_json(),
        created_at=b.created_at,
    )


def _array(values: Any, what: str) -> np.ndarray[Any, Any]:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InvalidDriftInput(f"{what} must be a rectangular array of numbers: {exc}") from None
    return arr


@router.put("/models/{name}/versions/{version}/drift/baseline", response_model=BaselinePublic)
def set_baseline(
    name: str, version: str, body: BaselineCreate, registry: RegistryDep, loop: ClosedLoopDep
) -> BaselinePublic:
    # References hold what a source feeds the model, read in the layout its signature gives.
    layout = sketch_layout(registry.get(name, version).signature)
    given = [x for x in (body.reference, body.dataset, body.production) if x is not None]
    if len(given) != 1:
        raise InvalidDriftInput("give exactly one of reference, dataset or production")
    if body.reference is not None:
        probs = body.reference.probabilities
        baseline = loop.baselines.set_reference(
            name,
            version,
            _array(body.reference.inputs, "inputs"),
            None if probs is None else _array(probs, "probabilities"),
            body.bins,
            layout,
        )
    elif body.dataset is not None:
        with np.load(io.BytesIO(loop.datasets.read(body.dataset)), allow_pickle=False) as npz:
            inputs = npz["inputs"]
            probs_arr = npz["probabilities"] if "probabilities" in npz.files else None
        baseline = loop.baselines.set_reference(name, version, inputs, probs_arr, body.bins, layout)
    else:
        assert body.production is not None
        s = body.production.spec
        spec = SketchSpec(
            {k: tuple(v) for k, v in s.features.items()},
            tuple(s.confidence_edges) if s.confidence_edges else CONFIDENCE_EDGES,
            s.num_classes,
        )
        baseline = loop.baselines.set_production(name, version, body.production.windows, spec)
    return baseline_public(baseline)


@router.get("/models/{name}/versions/{version}/drift/baseline", response_model=BaselinePublic)
def get_baseline(name: str, version: str, loop: ClosedLoopDep) -> BaselinePublic:
    return baseline_public(loop.baselines.get(name, version))


@router.get("/models/{name}/versions/{version}/drift/spec")
def get_spec(name: str, version: str, loop: ClosedLoopDep, tenant: str = "default") -> dict[str, Any]:
    """The DriftSpec (protobuf JSON form) a device's desired state carries for this version."""
    spec = loop.baselines.get(name, version).spec
    return MessageToDict(spec_message(tenant, name, version, spec), preserving_proto_field_name=True)


@router.get("/models/{name}/versions/{version}/drift", response_model=DriftPublic)
def fleet_drift(name: str, version: str, loop: ClosedLoopDep, since_ms: SinceMs = 0) -> DriftPublic:
    baseline = loop.baselines.get(name, version)
    return DriftPublic(
        model_name=name,
        model_version=version,
        baseline=baseline_public(baseline),
        bucket_s=loop.settings.rollup_window_s,
        fleet=[w.to_json() for w in loop.baselines.fleet_scores(name, version, since_ms)],
        devices={d: w.to_json() for d, w in loop.baselines.latest_by_device(name, version, since_ms).items()},
    )


@router.get("/models/{name}/versions/{version}/drift/devices/{device_id}")
def device_drift(
    name: str, version: str, device_id: str, loop: ClosedLoopDep, fleet: FleetDep, since_ms: SinceMs = 0
) -> list[dict[str, Any]]:
    fleet.get(device_id)
    loop.baselines.get(name, version)
    return [w.to_json() for w in loop.baselines.device_scores(name, version, device_id, since_ms)]
