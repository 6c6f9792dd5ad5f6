"""Tenant apps: who they are, what feeds them, how their samples are prepared.

A tenant is declared in agent.toml (``[[tenants]]``) or by the controller in the
desired state (``DesiredState.tenants``); both go through :func:`parse_tenant`, so
one set of rules and one set of error messages applies. Values may arrive as
TOML types or as text (protobuf maps carry strings): ``"32,32"`` and ``[32, 32]``
mean the same. Pure code: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.tenancy import (
    INPUT_KEYS,
    INPUT_ROLES,
    POSTPROCESS_KEYS,
    POSTPROCESS_KINDS,
    PREPROCESS_KEYS,
    SHADOW_SUFFIX,
    SINKS,
    SOURCE_OPTIONS,
    TENANT_ID,
    YOLO_LAYOUTS,
)

from agent.errors import TenantError
from agent.feeds import InputFeed
from agent.postprocess import ACTIVATIONS, PostprocessSpec

TENANT_KEYS = frozenset(
    {"id", "model", "token", "token_sha256", "rate_hz", "weight", "queue", "results", "source", "preprocess"}
    | {"postprocess", "inputs"}
)
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool")


def shadow_of(tenant: str) -> str:
    return tenant + SHADOW_SUFFIX


def is_shadow(tenant: str) -> bool:
    return tenant.endswith(SHADOW_SUFFIX)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    uri: str = ""
    options: Mapping[str, str] = field(default_factory=dict)

    def option(self, key: str, default: str) -> str:
        return self.options.get(key, default)

    def flag(self, key: str) -> bool:
        return self.options.get(key, "false").lower() in ("1", "true", "yes", "on")

    def number(self, key: str, default: float) -> float:
        return float(self.options.get(key, default))


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw samples become the model's input; every field optional."""

    input: str = ""
    crop: tuple[int, int, int, int] | None = None  # top, left, height, width
    resize: tuple[int, int] | None = None  # height, width
    fit: str = "stretch"  # or "letterbox": keep the aspect ratio and pad
    color: str = ""  # "rgb", "bgr" or "gray"; image sources deliver BGR
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "nhwc"  # or "nchw"
    dtype: str = "float32"
    # Audio samples or sensor rows per model input; 0 = one sample, or the length of the
    # model's audio input when its signature gives one (agent.signature.framed).
    window: int = 0
    hop: int = 0  # defaults to window
    features: str = "raw"  # audio: "raw" or "log_mel"
    n_fft: int = 512
    n_mels: int = 40
    batch: bool = True


@dataclass(frozen=True)
class TenantSpec:
    id: str
    source: SourceSpec | None = None
    model: str = ""
    preprocess: PreprocessSpec = PreprocessSpec()
    rate_hz: float = 0.0
    weight: float = 1.0
    queue: int = 4
    results: frozenset[str] = frozenset({"grpc"})
    token_sha256: str = ""
    postprocess: PostprocessSpec = field(default_factory=PostprocessSpec)
    inputs: tuple[InputFeed, ...] = ()

    def accepts(self, token: str) -> bool:
        return bool(self.token_sha256) and hmac.compare_digest(hash_token(token), self.token_sha256)


def validate_tenant_id(tenant: str) -> str:
    if not TENANT_ID.match(tenant):
        raise TenantError(
            f"invalid tenant id {tenant!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return tenant


def _ints(value: Any, n: int, what: str) -> tuple[int, ...]:
    items = _list(value, what)
    try:
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise TenantError(f"{what}: expected {n} integers, got {value!r}") from None
    if len(out) != n or any(v < 0 for v in out):
        raise TenantError(f"{what}: expected {n} non-negative integers, got {value!r}")
    return out


def _floats(value: Any, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in _list(value, what))
    except (TypeError, ValueError):
        raise TenantError(f"{what}: expected numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise TenantError(f"{what}: numbers must be finite, got {value!r}")
    return out


def _list(value: Any, what: str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    raise TenantError(f"{what}: expected a list, got {value!r}")


def _number(value: Any, what: str, minimum: float, integer: bool = False) -> float:
    if isinstance(value, bool):
        raise TenantError(f"{what}: expected a number, got {value!r}")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise TenantError(
            f"{what}: expected {'an integer' if integer else 'a number'}, got {value!r}"
        ) from None
    if not math.isfinite(number) or number < minimum:
        raise TenantError(f"{what}: must be at least {minimum}, got {value!r}")
    return number


def _choice(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    text = str(value).lower()
    if text not in allowed:
        raise TenantError(f"{what}: must be one of {', '.join(allowed)}, got {value!r}")
    return text


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise TenantError(f"{what}: expected true or false, got {value!r}")


def parse_preprocess(table: Mapping[str, Any], where: str) -> PreprocessSpec:
    unknown = sorted(set(table) - PREPROCESS_KEYS)
    if unknown:
        raise TenantError(
            f"{where}: unknown key(s) {unknown} (expected some of {', '.join(sorted(PREPROCESS_KEYS))})"
        )
    kw: dict[str, Any] = {}
    for key, value in table.items():
        what = f"{where}.{key}"
        if key == "input":
            kw[key] = str(value)
        elif key == "crop":
            kw[key] = _ints(value, 4, what)
        elif key == "resize":
            size = _ints(value, 2, what)
            if 0 in size:
                raise TenantError(f"{what}: sizes must be positive, got {value!r}")
            kw[key] = size
        elif key == "fit":
            kw[key] = _choice(value, what, ("stretch", "letterbox"))
        elif key == "color":
            kw[key] = _choice(value, what, ("rgb", "bgr", "gray"))
        elif key == "scale":
            kw[key] = _number(value, what, -math.inf)
        elif key in ("mean", "std"):
            kw[key] = _floats(value, what)
            if key == "std" and any(v == 0 for v in kw[key]):
                raise TenantError(f"{what}: a standard deviation of 0 would divide by zero")
        elif key == "layout":
            kw[key] = _choice(value, what, ("nhwc", "nchw"))
        elif key == "dtype":
            kw[key] = _choice(value, what, DTYPES[:-1])
        elif key in ("window", "hop"):
            kw[key] = int(_number(value, what, 0, integer=True))
        elif key == "features":
            kw[key] = _choice(value, what, ("raw", "log_mel"))
        elif key in ("n_fft", "n_mels"):
            kw[key] = int(_number(value, what, 2, integer=True))
        elif key == "batch":
            kw[key] = _bool(value, what)
    # A hop without a window is allowed: the window may come from the model's signature
    # (an audio input of fixed length); without one, the hop has nothing to move.
    return PreprocessSpec(**kw)


def parse_postprocess(table: Mapping[str, Any], where: str) -> PostprocessSpec:
    unknown = sorted(set(table) - POSTPROCESS_KEYS)
    if unknown:
        raise TenantError(
            f"{where}: unknown key(s) {unknown} (expected some of {', '.join(sorted(POSTPROCESS_KEYS))})"
        )
    if "kind" not in table:
        raise TenantError(f"{where}.kind: missing (one of {', '.join(POSTPROCESS_KINDS)})")
    kw: dict[str, Any] = {}
    for key, value in table.items():
        what = f"{where}.{key}"
        if key == "kind":
            kw[key] = _choice(value, what, POSTPROCESS_KINDS)
        elif key in ("output", "boxes_output"):
            kw[key] = str(value)
        elif key == "activation":
            kw[key] = _choice(value, what, ACTIVATIONS)
        elif key == "yolo_layout":
            kw[key] = _choice(value, what, YOLO_LAYOUTS)
        elif key in ("top_k", "max_detections", "anchors_per_layer"):
            kw[key] = int(_number(value, what, 1, integer=True))
        elif key in ("threshold", "iou_threshold", "anchor_offset"):
            kw[key] = _number(value, what, 0)
        elif key == "labels":
            kw[key] = tuple(str(v).strip() for v in _list(value, what))
        elif key == "strides":
            strides = tuple(int(_number(v, what, 1, integer=True)) for v in _list(value, what))
            kw[key] = strides
        elif key == "raw":
            kw[key] = _bool(value, what)
    spec = PostprocessSpec(**kw)
    if spec.kind == "ssd" and not spec.strides:
        raise TenantError(f"{where}.strides: an ssd decoder needs the anchor strides, e.g. [8, 16, 16, 16]")
    return spec


def parse_inputs(table: Mapping[str, Any], where: str) -> tuple[InputFeed, ...]:
    feeds = []
    for name, doc in sorted(table.items()):
        what = f"{where}.{name}"
        if not isinstance(doc, Mapping):
            raise TenantError(f"{what}: expected a table with a role")
        unknown = sorted(set(doc) - INPUT_KEYS)
        if unknown:
            raise TenantError(
                f"{what}: unknown key(s) {unknown} (expected some of {', '.join(sorted(INPUT_KEYS))})"
            )
        role = _choice(doc.get("role", ""), f"{what}.role", INPUT_ROLES)
        value = doc.get("value", 0.0)
        values = tuple(_number(v, f"{what}.value", -math.inf) for v in _list(value, f"{what}.value"))
        shape = tuple(
            int(_number(v, f"{what}.shape", 1, integer=True))
            for v in _list(doc.get("shape", []), f"{what}.shape")
        )
        from_output = str(doc.get("from", ""))
        if role == "state" and not from_output:
            raise TenantError(f"{what}.from: a state input needs the output it is carried from")
        if role == "constant" and from_output:
            raise TenantError(f"{what}.from: only a state input is carried from an output")
        feed = InputFeed(
            name=str(name),
            role=role,
            value=values or (0.0,),
            shape=shape,
            dtype=_choice(doc.get("dtype", "float32"), f"{what}.dtype", DTYPES),
            from_output=from_output,
        )
        feed.initial()  # refuses values that do not fill the shape, now rather than per inference
        feeds.append(feed)
    return tuple(feeds)


def parse_source(table: Mapping[str, Any], where: str) -> SourceSpec:
    kind = str(table.get("kind", ""))
    if kind not in SOURCE_OPTIONS:
        raise TenantError(f"{where}.kind: must be one of {', '.join(sorted(SOURCE_OPTIONS))}, got {kind!r}")
    uri = table.get("uri", "")
    if not isinstance(uri, str | int) or isinstance(uri, bool):
        raise TenantError(f"{where}.uri: expected text, got {uri!r}")
    options = {k: v for k, v in table.items() if k not in ("kind", "uri")}
    unknown = sorted(set(options) - SOURCE_OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(SOURCE_OPTIONS[kind])) or "none"
        raise TenantError(f"{where}: unknown option(s) {unknown} for a {kind} source (expected: {allowed})")
    if kind not in ("synthetic", "microphone") and not uri:
        raise TenantError(f"{where}.uri: a {kind} source needs a uri")
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    return SourceSpec(kind, str(uri), text)


def parse_tenant(table: Mapping[str, Any], where: str = "tenant") -> TenantSpec:
    """One tenant from a TOML table or the text form of a TenantSpec message."""
    unknown = sorted(set(table) - TENANT_KEYS)
    if unknown:
        raise TenantError(
            f"{where}: unknown key(s) {unknown} (expected some of {', '.join(sorted(TENANT_KEYS))})"
        )
    if "id" not in table:
        raise TenantError(f"{where}.id: missing (required)")
    tenant = validate_tenant_id(str(table["id"]))
    where = f"{where} {tenant!r}"
    source = table.get("source")
    if source is not None and not isinstance(source, Mapping):
        raise TenantError(f"{where}.source: expected a table")
    preprocess = table.get("preprocess", {})
    if not isinstance(preprocess, Mapping):
        raise TenantError(f"{where}.preprocess: expected a table")
    token_sha256 = str(table.get("token_sha256", ""))
    if "token" in table:
        if not isinstance(table["token"], str) or len(table["token"]) < 16:
            raise TenantError(f"{where}.token: use a random string of at least 16 characters")
        token_sha256 = hash_token(table["token"])
    if token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", token_sha256):
        raise TenantError(f"{where}.token_sha256: expected 64 lowercase hex digits")
    results = frozenset(str(r) for r in _list(table.get("results", ["grpc"]), f"{where}.results"))
    if not results or not results <= SINKS:
        raise TenantError(
            f"{where}.results: must be some of {', '.join(sorted(SINKS))}, got {sorted(results)}"
        )
    postprocess = table.get("postprocess")
    if postprocess is not None and not isinstance(postprocess, Mapping):
        raise TenantError(f"{where}.postprocess: expected a table")
    inputs = table.get("inputs", {})
    if not isinstance(inputs, Mapping):
        raise TenantError(f"{where}.inputs: expected a table of input names")
    return TenantSpec(
        id=tenant,
        postprocess=parse_postprocess(postprocess, f"{where}.postprocess")
        if postprocess
        else PostprocessSpec(),
        inputs=parse_inputs(inputs, f"{where}.inputs"),
        source=parse_source(source, f"{where}.source") if source is not None else None,
        model=str(table.get("model", "")),
        preprocess=parse_preprocess(preprocess, f"{where}.preprocess"),
        rate_hz=_number(table.get("rate_hz", 0.0), f"{where}.rate_hz", 0),
        weight=_positive(table.get("weight", 1.0), f"{where}.weight"),
        queue=int(_number(table.get("queue", 4), f"{where}.queue", 1, integer=True)),
        results=results,
        token_sha256=token_sha256,
    )


def _positive(value: Any, what: str) -> float:
    number = _number(value, what, 0)
    if number <= 0:
        raise TenantError(f"{what}: must be greater than 0, got {value!r}")
    return number


def from_proto(msg: fleet_pb2.TenantSpec) -> TenantSpec:
    """A controller-declared tenant; zero values mean "the default"."""
    table: dict[str, Any] = {"id": msg.tenant, "preprocess": dict(msg.preprocess)}
    if msg.model_name:
        table["model"] = msg.model_name
    if msg.HasField("source"):
        table["source"] = {"kind": msg.source.kind, "uri": msg.source.uri, **dict(msg.source.options)}
    if msg.target_rate_hz:
        table["rate_hz"] = msg.target_rate_hz
    if msg.weight:
        table["weight"] = msg.weight
    if msg.queue_bound:
        table["queue"] = msg.queue_bound
    if msg.results:
        table["results"] = list(msg.results)
    if msg.token_sha256:
        table["token_sha256"] = msg.token_sha256
    if msg.postprocess:
        table["postprocess"] = dict(msg.postprocess)
    if msg.inputs:
        table["inputs"] = {
            f.name: {
                "role": f.role,
                "value": list(f.value),
                "shape": list(f.shape),
                "dtype": f.dtype or "float32",
                **({"from": f.from_output} if f.from_output else {}),
            }
            for f in msg.inputs
        }
    return parse_tenant(table, "desired tenant")


def merge(configured: tuple[TenantSpec, ...], declared: tuple[TenantSpec, ...]) -> tuple[TenantSpec, ...]:
    """Config tenants, with any the controller declares replacing those of the same id."""
    by_id = {t.id: t for t in configured}
    by_id.update({t.id: t for t in declared})
    return tuple(by_id[k] for k in sorted(by_id))
