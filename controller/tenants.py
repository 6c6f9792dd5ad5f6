"""Tenant apps the controller declares on a device, carried in its desired state.

An operator puts a device's whole tenant list at once (``PUT /v1/devices/{id}/tenants``).
:func:`parse_tenants` checks it with the agent's rules (``agent.tenants``; the
halves share no code, so the rules are repeated here and the messages match), the
list is stored in SQLite, and the device's desired state is re-issued with
``DesiredState.tenants`` replaced (generation + 1, compare-and-set on the stored
generation, published after the commit). Tokens are hashed on the way in: only
``token_sha256`` is stored or sent, and no response carries either.
:func:`with_tenants` (pure) is also what the maintenance tick uses to keep every
desired state carrying exactly its device's stored tenants.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as, encode
from edgefleet_proto.tenancy import (
    INPUT_KEYS,
    INPUT_ROLES,
    POSTPROCESS_ACTIVATIONS,
    POSTPROCESS_KEYS,
    POSTPROCESS_KINDS,
    PREPROCESS_KEYS,
    SINKS,
    SOURCE_OPTIONS,
    TENANT_ID,
    YOLO_LAYOUTS,
)

from controller.errors import InvalidTenantSpec, UnknownTargets
from controller.registry import newest_signature
from controller.store import Store
from controller.tenant_fit import check_tenant_signature

log = logging.getLogger(__name__)

MAX_TENANTS = 64
MIN_TOKEN_CHARS = 16


class Publisher(Protocol):
    def publish_desired(self, device_id: str, payload: bytes) -> None: ...


@dataclass(frozen=True)
class Source:
    kind: str
    uri: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceTenant:
    id: str
    model: str
    source: Source | None
    preprocess: dict[str, str]
    rate_hz: float
    weight: float
    queue: int
    results: list[str]
    token_sha256: str = ""
    # Post-processing, values as text (lists comma-separated), and input feeds as the
    # agent's [tenants.inputs] tables; the agent checks both against the model it runs.
    postprocess: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_token(self) -> bool:
        return bool(self.token_sha256)

    def to_proto(self) -> fleet_pb2.TenantSpec:
        msg = fleet_pb2.TenantSpec(
            tenant=self.id,
            model_name=self.model,
            preprocess=self.preprocess,
            target_rate_hz=self.rate_hz,
            weight=self.weight,
            queue_bound=self.queue,
            results=self.results,
            token_sha256=self.token_sha256,
            postprocess=self.postprocess,
        )
        for feed in self.inputs:
            msg.inputs.add(
                name=feed["name"],
                role=feed["role"],
                value=feed["value"],
                shape=feed["shape"],
                dtype=feed["dtype"],
                from_output=feed.get("from", ""),
            )
        if self.source is not None:
            msg.source.CopyFrom(
                fleet_pb2.SourceSpec(kind=self.source.kind, uri=self.source.uri, options=self.source.options)
            )
        return msg

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceTenant:
        source = data.pop("source")
        return cls(source=Source(**source) if source else None, **data)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def _number(value: Any, what: str, *, integer: bool = False, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTenantSpec(f"{what}: expected a number, got {value!r}")
    if (
        not math.isfinite(value)
        or value < 0
        or (positive and value <= 0)
        or (integer and value != int(value))
    ):
        kind = "a whole number" if integer else "a number"
        bound = "greater than 0" if positive else "at least 0"
        raise InvalidTenantSpec(f"{what}: must be {kind} {bound}, got {value!r}")
    return value


_CHOICES = {
    "color": ("rgb", "bgr", "gray"),
    "layout": ("nhwc", "nchw"),
    "dtype": ("float32", "float16", "float64", "uint8", "int8", "int32", "int64"),
    "features": ("raw", "log_mel"),
    "batch": ("true", "false", "1", "0", "yes", "no", "on", "off"),
}
# Lists: how many numbers (None: any), integers or not.
_LISTS: dict[str, tuple[int | None, bool]] = {
    "crop": (4, True),
    "resize": (2, True),
    "mean": (None, False),
    "std": (None, False),
    "scale": (1, False),
    "window": (1, True),
    "hop": (1, True),
    "n_fft": (1, True),
    "n_mels": (1, True),
}


def _preprocess_value(key: str, value: str, what: str) -> None:
    """The agent's checks on one preprocessing value (agent.tenants.parse_preprocess), on its text form."""
    if key in _CHOICES:
        if value.lower() not in _CHOICES[key]:
            raise InvalidTenantSpec(f"{what}: must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        return
    if key not in _LISTS:
        return
    count, integer = _LISTS[key]
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        numbers = [int(v) if integer else float(v) for v in items]
    except ValueError:
        numbers = []
    if not numbers or (count is not None and len(numbers) != count) or not all(map(math.isfinite, numbers)):
        kind = "integers" if integer else "numbers"
        raise InvalidTenantSpec(f"{what}: expected {count or 'some'} {kind}, got {value!r}")
    if integer and (
        min(numbers) < (2 if key in ("n_fft", "n_mels") else 0) or (key == "resize" and 0 in numbers)
    ):
        raise InvalidTenantSpec(f"{what}: out of range, got {value!r}")
    if key == "std" and 0 in numbers:
        raise InvalidTenantSpec(f"{what}: a standard deviation of 0 would divide by zero")


def _source(doc: Any, where: str) -> Source:
    if not isinstance(doc, Mapping):
        raise InvalidTenantSpec(f"{where}: expected an object with kind, uri and options")
    unknown = sorted(set(doc) - {"kind", "uri", "options"})
    if unknown:
        raise InvalidTenantSpec(f"{where}: unknown field(s) {unknown} (expected kind, uri, options)")
    kind = doc.get("kind", "")
    if kind not in SOURCE_OPTIONS:
        raise InvalidTenantSpec(
            f"{where}.kind: unknown source kind {kind!r} (expected one of {', '.join(sorted(SOURCE_OPTIONS))})"
        )
    uri = doc.get("uri", "")
    if not isinstance(uri, str | int) or isinstance(uri, bool):
        raise InvalidTenantSpec(f"{where}.uri: expected text, got {uri!r}")
    if kind not in ("synthetic", "microphone") and not str(uri):
        raise InvalidTenantSpec(f"{where}.uri: a {kind} source needs a uri")
    options = doc.get("options") or {}
    if not isinstance(options, Mapping):
        raise InvalidTenantSpec(f"{where}.options: expected an object")
    bad = sorted(set(options) - SOURCE_OPTIONS[kind])
    if bad:
        allowed = ", ".join(sorted(SOURCE_OPTIONS[kind]))
        raise InvalidTenantSpec(
            f"{where}.options: unknown option(s) {bad} for a {kind} source (expected: {allowed})"
        )
    return Source(kind, str(uri), {k: _text(v) for k, v in sorted(options.items())})


def parse_tenant(doc: Mapping[str, Any], models: set[str], where: str) -> DeviceTenant:
    tenant_id = doc.get("id")
    if not isinstance(tenant_id, str) or not TENANT_ID.match(tenant_id):
        raise InvalidTenantSpec(
            f"{where}.id: invalid tenant id {tenant_id!r}: use 1-64 letters, digits, '_' or '-',"
            " starting with a letter or digit"
        )
    where = f"tenant {tenant_id!r}"
    model = doc.get("model") or ""
    if not isinstance(model, str) or not model:
        raise InvalidTenantSpec(f"{where}.model: missing (the name of the registered model it runs)")
    if model not in models:
        raise InvalidTenantSpec(f"{where}.model: unknown model {model!r} (upload it first)")
    preprocess = doc.get("preprocess") or {}
    if not isinstance(preprocess, Mapping):
        raise InvalidTenantSpec(f"{where}.preprocess: expected an object")
    unknown = sorted(set(preprocess) - PREPROCESS_KEYS)
    if unknown:
        raise InvalidTenantSpec(
            f"{where}.preprocess: unknown key(s) {unknown} (expected some of {', '.join(sorted(PREPROCESS_KEYS))})"
        )
    preprocess = {k: _text(v) for k, v in sorted(preprocess.items())}
    for key, value in preprocess.items():
        _preprocess_value(key, value, f"{where}.preprocess.{key}")
    results = doc.get("results") or ["grpc"]
    if not isinstance(results, list) or not results or not set(results) <= set(SINKS):
        raise InvalidTenantSpec(
            f"{where}.results: must be some of {', '.join(sorted(SINKS))}, got {results!r}"
        )
    token, token_sha256 = doc.get("token") or "", doc.get("token_sha256") or ""
    if token and token_sha256:
        raise InvalidTenantSpec(f"{where}: give token or token_sha256, not both")
    if token:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise InvalidTenantSpec(
                f"{where}.token: use a random string of at least {MIN_TOKEN_CHARS} characters"
            )
        token_sha256 = hashlib.sha256(token.encode()).hexdigest()
    if token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", str(token_sha256)):
        raise InvalidTenantSpec(f"{where}.token_sha256: expected 64 lowercase hex digits")
    source = doc.get("source")
    postprocess = _postprocess(doc.get("postprocess") or {}, f"{where}.postprocess")
    inputs = _inputs(doc.get("inputs") or {}, f"{where}.inputs")
    return DeviceTenant(
        postprocess=postprocess,
        inputs=inputs,
        id=tenant_id,
        model=model,
        source=_source(source, f"{where}.source") if source is not None else None,
        preprocess=preprocess,
        rate_hz=float(_number(doc.get("rate_hz", 0.0), f"{where}.rate_hz")),
        weight=float(_number(doc.get("weight", 1.0), f"{where}.weight", positive=True)),
        queue=int(_number(doc.get("queue", 4), f"{where}.queue", integer=True, positive=True)),
        results=sorted(set(results)),
        token_sha256=str(token_sha256),
    )


def _postprocess(doc: Any, where: str) -> dict[str, str]:
    if not isinstance(doc, Mapping):
        raise InvalidTenantSpec(f"{where}: expected an object")
    if not doc:
        return {}
    unknown = sorted(set(doc) - POSTPROCESS_KEYS)
    if unknown:
        raise InvalidTenantSpec(
            f"{where}: unknown key(s) {unknown} (expected some of {', '.join(sorted(POSTPROCESS_KEYS))})"
        )
    if doc.get("kind") not in POSTPROCESS_KINDS:
        raise InvalidTenantSpec(
            f"{where}.kind: must be one of {', '.join(POSTPROCESS_KINDS)}, got {doc.get('kind')!r}"
        )
    if doc["kind"] == "ssd" and not doc.get("strides"):
        raise InvalidTenantSpec(
            f"{where}.strides: an ssd decoder needs the anchor strides, e.g. [8, 16, 16, 16]"
        )
    for key, value in doc.items():
        _postprocess_value(key, value, f"{where}.{key}")
    return {k: _text(v) for k, v in sorted(doc.items())}


def _whole(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and value == int(value) and value >= 1
    )


def _postprocess_value(key: str, value: Any, what: str) -> None:
    """The agent's checks on one post-processing value (agent.tenants.parse_postprocess)."""
    if key in ("output", "boxes_output") and not isinstance(value, str):
        raise InvalidTenantSpec(f"{what}: expected the name of an output, got {value!r}")
    if key == "activation" and value not in POSTPROCESS_ACTIVATIONS:
        raise InvalidTenantSpec(f"{what}: must be one of {', '.join(POSTPROCESS_ACTIVATIONS)}, got {value!r}")
    if key == "yolo_layout" and value not in YOLO_LAYOUTS:
        raise InvalidTenantSpec(f"{what}: must be one of {', '.join(YOLO_LAYOUTS)}, got {value!r}")
    if key in ("top_k", "max_detections", "anchors_per_layer") and not _whole(value):
        raise InvalidTenantSpec(f"{what}: expected a whole number of at least 1, got {value!r}")
    if key == "strides" and not (isinstance(value, list) and value and all(map(_whole, value))):
        raise InvalidTenantSpec(f"{what}: expected whole numbers of at least 1, got {value!r}")
    if key in ("threshold", "iou_threshold", "anchor_offset") and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf
    ):
        raise InvalidTenantSpec(f"{what}: expected a number of at least 0, got {value!r}")
    if key == "raw" and not isinstance(value, bool):
        raise InvalidTenantSpec(f"{what}: expected true or false, got {value!r}")
    if key == "labels" and not (
        isinstance(value, list) and all(isinstance(v, str) and "," not in v for v in value)
    ):
        raise InvalidTenantSpec(f"{what}: expected a list of labels without commas, got {value!r}")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidTenantSpec(f"{what}: expected a finite number, got {value!r}")
    return float(value)


def _inputs(doc: Any, where: str) -> list[dict[str, Any]]:
    """Input feeds as the agent reads them; numbers are checked here, names against the model there."""
    if not isinstance(doc, Mapping):
        raise InvalidTenantSpec(f"{where}: expected an object of input names")
    feeds = []
    for name, feed in sorted(doc.items()):
        what = f"{where}.{name}"
        if not isinstance(feed, Mapping):
            raise InvalidTenantSpec(f"{what}: expected an object with a role")
        unknown = sorted(set(feed) - INPUT_KEYS)
        if unknown:
            raise InvalidTenantSpec(
                f"{what}: unknown key(s) {unknown} (expected some of {', '.join(sorted(INPUT_KEYS))})"
            )
        if feed.get("role") not in INPUT_ROLES:
            raise InvalidTenantSpec(
                f"{what}.role: must be one of {', '.join(INPUT_ROLES)}, got {feed.get('role')!r}"
            )
        if (feed["role"] == "state") != bool(feed.get("from")):
            raise InvalidTenantSpec(
                f"{what}.from: a state input, and only a state input, names the output it is carried from"
            )
        value = feed.get("value", 0.0)
        values = value if isinstance(value, list) else [value]
        shape = feed.get("shape", [])
        if not isinstance(shape, list):
            raise InvalidTenantSpec(f"{what}.shape: expected a list of sizes")
        entry: dict[str, Any] = {
            "name": str(name),
            "role": feed["role"],
            "value": [_finite(v, f"{what}.value") for v in values],
            "shape": [int(_number(v, f"{what}.shape", integer=True, positive=True)) for v in shape],
            "dtype": str(feed.get("dtype", "float32")),
        }
        if feed.get("from"):
            entry["from"] = str(feed["from"])
        feeds.append(entry)
    return feeds


def parse_tenants(docs: Sequence[Mapping[str, Any]], models: set[str]) -> list[DeviceTenant]:
    """A device's tenant list, checked whole: the first problem is raised, naming the tenant and field."""
    if len(docs) > MAX_TENANTS:
        raise InvalidTenantSpec(f"at most {MAX_TENANTS} tenants per device, got {len(docs)}")
    tenants = [parse_tenant(doc, models, f"tenants[{i}]") for i, doc in enumerate(docs)]
    seen: set[str] = set()
    for t in tenants:
        if t.id in seen:
            raise InvalidTenantSpec(f"tenant id {t.id!r} is declared twice")
        seen.add(t.id)
    return sorted(tenants, key=lambda t: t.id)


def with_tenants(desired: fleet_pb2.DesiredState, tenants: Sequence[DeviceTenant]) -> fleet_pb2.DesiredState:
    """``desired`` carrying exactly ``tenants``; the generation is left to the caller."""
    out = fleet_pb2.DesiredState()
    out.CopyFrom(desired)
    del out.tenants[:]
    out.tenants.extend(t.to_proto() for t in tenants)
    return out


class DeviceTenants:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.publisher: Publisher | None = None

    def get(self, device_id: str) -> list[DeviceTenant]:
        row = self.store.query_one("SELECT tenants FROM device_tenants WHERE device_id = ?", (device_id,))
        return [DeviceTenant.from_json(t) for t in json.loads(row["tenants"])] if row else []

    def all(self) -> dict[str, list[DeviceTenant]]:
        rows = self.store.query("SELECT device_id, tenants FROM device_tenants")
        return {r["device_id"]: [DeviceTenant.from_json(t) for t in json.loads(r["tenants"])] for r in rows}

    def put(self, device_id: str, docs: Sequence[Mapping[str, Any]]) -> list[DeviceTenant]:
        """Replace the device's tenants and re-issue its desired state; nothing changes on bad input."""
        if self.store.query_one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is None:
            raise UnknownTargets(f"unknown device {device_id}")
        models = {r["name"] for r in self.store.query("SELECT name FROM models")}
        tenants = parse_tenants(docs, models)
        for tenant in tenants:
            check_tenant_signature(tenant, newest_signature(self.store, tenant.model))
        # Read, compare and write in one transaction: a rollout pass cannot interleave.
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT INTO device_tenants (device_id, tenants, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (device_id) DO UPDATE SET tenants = excluded.tenants,"
                " updated_at = excluded.updated_at",
                (device_id, json.dumps([asdict(t) for t in tenants]), self.clock()),
            )
            payload = self._reissue(tx, device_id, tenants)
        log.info(
            "device tenants set device=%s tenants=%s",
            device_id,
            ",".join(f"{t.id}:{t.model}" for t in tenants) or "-",
        )
        if payload and self.publisher is not None:
            self.publisher.publish_desired(device_id, payload)
        return tenants

    def _reissue(self, tx: Store, device_id: str, tenants: Sequence[DeviceTenant]) -> bytes | None:
        """The new desired payload; None when it already carried these tenants."""
        row = tx.query_one(
            "SELECT desired_generation, desired FROM devices WHERE device_id = ?", (device_id,)
        )
        assert row is not None
        current = fleet_pb2.DesiredState(device_id=device_id)
        if row["desired"] is not None:
            try:
                current = decode_as(fleet_pb2.DesiredState, bytes(row["desired"]))
            except PayloadError as exc:
                log.error("stored desired state unreadable device=%s error=%s", device_id, exc)
        wanted = with_tenants(current, tenants)
        if row["desired"] is not None and encode(wanted) == encode(current):
            return None
        wanted.generation = max(current.generation, row["desired_generation"]) + 1
        wanted.issued_at_ms = int(self.clock() * 1000)
        payload = encode(wanted)
        tx.execute(
            "UPDATE devices SET desired_generation = ?, desired = ? WHERE device_id = ?",
            (wanted.generation, payload, device_id),
        )
        log.info("desired tenants updated device=%s generation=%d", device_id, wanted.generation)
        return payload
