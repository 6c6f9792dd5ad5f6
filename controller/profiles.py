"""Device profiles: one TOML document per device class (see firmware_profiles/README.md).

:func:`parse_profile` checks a document against the schema and reports every
problem with its line (``FILE:LINE: field: problem``); :class:`Profiles`
registers and updates profiles, says which profile a device belongs to, and
turns a version's variants into the signed assignment each device should get
(the choice itself is :func:`controller.variants.choose`, a pure function).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import PayloadError, decode_as
from edgefleet_proto.tenancy import tenant_or_default

from controller.errors import DeviceNotFound, InvalidProfile, ProfileNotFound, RolloutNotFound
from controller.onnx_compat import ir_version_of, max_ir_version
from controller.registry import LOWERED, ModelVersion, Registry, Variant
from controller.store import Store
from controller.variants import (
    MEMORY_FACTOR,
    RUNTIME_FOR_FORMAT,
    Candidate,
    Choice,
    DeviceClass,
    Sensor,
    choose,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ARCHITECTURES = ("aarch64", "armv7l", "x86_64")
ACCELERATOR_KINDS = ("gpu", "npu", "tpu")
PRECISIONS = ("fp32", "fp16", "int8")
SENSOR_KINDS = ("camera", "microphone", "sensor")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}\Z")

# Expected type of every key, per table; "+" marks a required key.
_Spec = dict[str, tuple[type | tuple[type, ...], bool]]
TOP: _Spec = {"schema_version": (int, True), "id": (str, True), "name": (str, True), "vendor": (str, True)}
TABLES: dict[str, _Spec] = {
    "cpu": {
        "architecture": (str, True),
        "model": (str, True),
        "cores": (int, True),
        "max_frequency_mhz": (int, True),
    },
    "memory": {"ram_mb": (int, True), "model_budget_mb": (int, True)},
    "storage": {"kind": (str, True), "capacity_gb": ((int, float), True)},
    "inference": {
        "precisions": (list, True),
        "preferred_precision": (str, True),
        "max_onnx_opset": (int, False),
    },
}
ACCELERATOR: _Spec = {
    "kind": (str, True),
    "model": (str, True),
    "tops_int8": ((int, float), True),
    "precisions": (list, True),
    "runtime": (str, True),
}
SENSOR_BASE: _Spec = {"id": (str, True), "kind": (str, True), "model": (str, True)}
SENSOR_FIELDS: dict[str, _Spec] = {
    "camera": {"width": (int, True), "height": (int, True), "fps": (int, True), "pixel_format": (str, True)},
    "microphone": {"sample_rate_hz": (int, True), "channels": (int, True), "sample_format": (str, True)},
    "sensor": {"channels": (int, True), "sample_rate_hz": (int, True), "sample_format": (str, True)},
}
Path_ = tuple[str | int, ...]


class _Lines:
    """Finds the line where a key (or table) is written, for messages that point at it."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def of(self, path: Path_) -> int | None:
        table: Path_ = ()
        counts: dict[str, int] = {}
        best: int | None = None
        for number, raw in enumerate(self.lines, start=1):
            line = raw.split("#", 1)[0].strip()
            if m := re.match(r"^\[\[\s*([A-Za-z0-9_-]+)\s*\]\]$", line):
                index = counts.get(m.group(1), -1) + 1
                counts[m.group(1)] = index
                table = (m.group(1), index)
            elif m := re.match(r"^\[\s*([A-Za-z0-9_-]+)\s*\]$", line):
                table = (m.group(1),)
            else:
                m = re.match(r"^\"?([A-Za-z0-9_-]+)\"?\s*=", line)
                if m and (*table, m.group(1)) == path:
                    return number
                continue
            # A key that is absent points at its table's header.
            if table == path or (best is None and len(path) > len(table) and path[: len(table)] == table):
                best = number
        return best


@dataclass(frozen=True)
class Profile:
    id: str
    doc: dict[str, Any]
    source: str
    created_at: float = 0.0
    updated_at: float = 0.0

    def device_class(self) -> DeviceClass:
        inference = self.doc["inference"]
        return DeviceClass(
            profile_id=self.id,
            runtimes=dict(self.doc["runtimes"]),
            precisions=tuple(inference["precisions"]),
            preferred_precision=inference["preferred_precision"],
            model_budget_bytes=int(self.doc["memory"]["model_budget_mb"]) * 1024 * 1024,
            max_onnx_opset=inference.get("max_onnx_opset"),
            accelerated=bool(self.doc.get("accelerators")),
            # What its onnxruntime release reads (measured per release: controller.onnx_compat).
            max_onnx_ir=(
                max_ir_version(self.doc["runtimes"]["onnxruntime"])
                if "onnxruntime" in self.doc["runtimes"]
                else None
            ),
            sensors=tuple(
                Sensor(s["id"], s["kind"], int(s.get("channels", 3 if s["kind"] == "camera" else 0)))
                for s in self.doc.get("sensors", [])
            ),
        )


class _Checker:
    def __init__(self, text: str, source: str) -> None:
        self.lines = _Lines(text)
        self.source = source
        self.problems: list[str] = []

    def problem(self, path: Path_, message: str) -> None:
        line = self.lines.of(path)
        where = f"{self.source}:{line}" if line else self.source
        field = ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")
        self.problems.append(f"{where}: {field or '(document)'}: {message}")

    def table(self, table: dict[str, Any], spec: _Spec, path: Path_) -> None:
        for key, value in table.items():
            if key not in spec:
                self.problem((*path, key), f"unknown key (expected one of {', '.join(spec)})")
                continue
            kind, _ = spec[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                self.problem((*path, key), f"expected {want}, got {type(value).__name__} {value!r}")
            elif isinstance(value, int | float) and value <= 0 and key != "schema_version":
                self.problem((*path, key), f"must be positive, got {value}")
        for key, (_, required) in spec.items():
            if required and key not in table:
                self.problem(
                    path or (key,), f"missing required key {key!r}" if path else "missing (required)"
                )

    def one_of(self, value: Any, allowed: Sequence[str], path: Path_) -> None:
        if isinstance(value, str) and value not in allowed:
            self.problem(path, f"{value!r} is not one of {', '.join(allowed)}")

    def precisions(self, value: Any, path: Path_) -> None:
        if isinstance(value, list):
            if not value:
                self.problem(path, "needs at least one precision")
            for item in value:
                if item not in PRECISIONS:
                    self.problem(path, f"{item!r} is not one of {', '.join(PRECISIONS)}")


def parse_profile(text: str, source: str = "profile.toml", expected_id: str | None = None) -> Profile:
    """Validate a profile document; InvalidProfile lists every problem with its line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise InvalidProfile(f"{source}:{line.group(1) if line else '?'}: invalid TOML: {exc}") from None
    c = _Checker(text, source)
    top = {
        k: v
        for k, v in doc.items()
        if not isinstance(v, dict | list) or k not in (*TABLES, "runtimes", "accelerators", "sensors")
    }
    c.table(top, TOP, ())
    if doc.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        c.problem(("schema_version",), f"this controller reads schema version {SCHEMA_VERSION}")
    pid = doc.get("id")
    if isinstance(pid, str) and not _ID.match(pid):
        c.problem(("id",), f"{pid!r} must be 1-64 lower-case letters, digits and '-'")
    if expected_id is not None and isinstance(pid, str) and pid != expected_id:
        c.problem(("id",), f"{pid!r} differs from the file name {expected_id!r}")
    for name, spec in TABLES.items():
        table = doc.get(name)
        if not isinstance(table, dict):
            c.problem((name,), "missing table" if table is None else "expected a [table]")
            continue
        c.table(table, spec, (name,))
    cpu, memory, inference = (_as_table(doc.get(k)) for k in ("cpu", "memory", "inference"))
    c.one_of(cpu.get("architecture"), ARCHITECTURES, ("cpu", "architecture"))
    budget, ram = memory.get("model_budget_mb"), memory.get("ram_mb")
    if isinstance(budget, int) and isinstance(ram, int) and budget > ram:
        c.problem(("memory", "model_budget_mb"), f"{budget} MB is more than the {ram} MB of RAM")
    c.precisions(inference.get("precisions"), ("inference", "precisions"))
    preferred = inference.get("preferred_precision")
    if (
        isinstance(preferred, str)
        and isinstance(inference.get("precisions"), list)
        and preferred not in inference["precisions"]
    ):
        c.problem(("inference", "preferred_precision"), f"{preferred!r} is not in [inference] precisions")
    runtimes = doc.get("runtimes")
    if not isinstance(runtimes, dict) or not runtimes:
        c.problem(("runtimes",), "needs a [runtimes] table naming at least one runtime and its version")
        runtimes = {}
    for name, version in runtimes.items():
        if not isinstance(version, str) or not re.match(r"^\d+(\.\d+)*", version):
            c.problem(("runtimes", name), f'expected a version string such as "1.20.1", got {version!r}')
    if "onnxruntime" in runtimes and "max_onnx_opset" not in inference:
        c.problem(("inference",), "onnxruntime is installed but max_onnx_opset is missing")
    if "max_onnx_opset" in inference and "onnxruntime" not in runtimes:
        c.problem(("inference", "max_onnx_opset"), "set, but onnxruntime is not in [runtimes]")
    _accelerators(c, doc.get("accelerators", []), runtimes)
    _sensors(c, doc.get("sensors", []))
    if c.problems:
        raise InvalidProfile("\n".join(c.problems))
    assert isinstance(pid, str)
    return Profile(id=pid, doc=doc, source=text)


def _as_table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _accelerators(c: _Checker, items: Any, runtimes: dict[str, Any]) -> None:
    if not isinstance(items, list):
        c.problem(("accelerators",), "expected [[accelerators]] tables")
        return
    for i, acc in enumerate(items):
        c.table(acc, ACCELERATOR, ("accelerators", i))
        c.one_of(acc.get("kind"), ACCELERATOR_KINDS, ("accelerators", i, "kind"))
        c.precisions(acc.get("precisions"), ("accelerators", i, "precisions"))
        runtime = acc.get("runtime")
        if isinstance(runtime, str) and runtime not in runtimes:
            c.problem(("accelerators", i, "runtime"), f"{runtime!r} is not in [runtimes]")


def _sensors(c: _Checker, items: Any) -> None:
    if not isinstance(items, list):
        c.problem(("sensors",), "expected [[sensors]] tables")
        return
    seen: set[str] = set()
    for i, sensor in enumerate(items):
        kind = sensor.get("kind")
        spec = {**SENSOR_BASE, **SENSOR_FIELDS.get(kind if isinstance(kind, str) else "", {})}
        c.table(sensor, spec, ("sensors", i))
        c.one_of(kind, SENSOR_KINDS, ("sensors", i, "kind"))
        sid = sensor.get("id")
        if isinstance(sid, str):
            if sid in seen:
                c.problem(("sensors", i, "id"), f"sensor id {sid!r} is used twice")
            seen.add(sid)


def candidates(found: ModelVersion, ir_version: Callable[[Variant], int] = lambda v: 0) -> list[Candidate]:
    """The version's variants as the choice sees them; ``ir_version`` says what IR version an
    ONNX variant's file states (0: unknown, not checked)."""
    # The sensor feeds the signature's source input: its shape and layout decide the fit.
    source = next((i for i in found.signature.inputs if i.role == "source"), None)

    def fed(v: Variant) -> tuple[int, ...]:
        spec = next((t for t in v.inputs if source is not None and t.name == source.name), None)
        spec = spec or (v.inputs[0] if v.inputs else None)
        return tuple(spec.shape) if spec is not None else ()

    return [
        Candidate(
            variant=v.variant,
            format=v.format,
            precision=v.precision,
            status=v.status,
            size=v.size,
            opset=v.opset,
            input_shape=fed(v),
            input_layout=source.layout if source is not None else "",
            reference=v.source == "uploaded" and v.digest == found.digest,
            reason=v.reason,
            runtime_version=v.runtime_version,
            ir_version=ir_version(v),
            lowered=v.source == LOWERED,
        )
        for v in found.variants
    ]


@functools.lru_cache(maxsize=4096)
def _ir_version_at(path: Path) -> int:
    """The IR version an artifact's header states; its path names its digest, so the answer
    never changes (0 when the file is not here or not ONNX)."""
    try:
        return ir_version_of(path)
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class RolloutTarget:
    """What one device of a rollout was sent (``variant``, ``digest``) or why not (``skipped``)."""

    device_id: str
    profile: str
    variant: str
    digest: str
    skipped: str


@dataclass(frozen=True)
class Targeted:
    """What one device of a rollout is sent: a signed assignment, or nothing and why."""

    device_id: str
    assignment: fleet_pb2.ModelAssignment | None
    choice: Choice


class Profiles:
    def __init__(
        self, store: Store, registry: Registry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        # For the signing key's rotation record, attached to assignments it signed.
        self.registry = registry
        self.clock = clock

    def register(
        self, text: str, source: str = "profile.toml", expected_id: str | None = None
    ) -> tuple[Profile, bool]:
        """Create or replace a profile; returns it and whether it is new."""
        profile = parse_profile(text, source, expected_id)
        now = self.clock()
        with self.store.transaction() as tx:
            existing = tx.query_one("SELECT created_at FROM profiles WHERE id = ?", (profile.id,))
            if existing is None:
                tx.execute(
                    "INSERT INTO profiles (id, source, doc, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (profile.id, text, json.dumps(profile.doc), now, now),
                )
            else:
                tx.execute(
                    "UPDATE profiles SET source = ?, doc = ?, updated_at = ? WHERE id = ?",
                    (text, json.dumps(profile.doc), now, profile.id),
                )
        log.info("profile %s profile=%s", "registered" if existing is None else "updated", profile.id)
        return self.get(profile.id), existing is None

    def get(self, profile_id: str) -> Profile:
        row = self.store.query_one("SELECT * FROM profiles WHERE id = ?", (profile_id,))
        if row is None:
            raise ProfileNotFound(f"unknown profile {profile_id}")
        return Profile(row["id"], json.loads(row["doc"]), row["source"], row["created_at"], row["updated_at"])

    def all(self) -> list[Profile]:
        rows = self.store.query("SELECT id FROM profiles ORDER BY id")
        return [self.get(r["id"]) for r in rows]

    def assign(self, device_id: str, profile_id: str) -> None:
        self.get(profile_id)
        if self.store.query_one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is None:
            raise DeviceNotFound(f"unknown device {device_id}")
        self.store.execute(
            "INSERT INTO device_profiles (device_id, profile_id) VALUES (?, ?)"
            " ON CONFLICT (device_id) DO UPDATE SET profile_id = excluded.profile_id",
            (device_id, profile_id),
        )
        log.info("device profile set device=%s profile=%s", device_id, profile_id)

    def of_device(self, device_id: str) -> Profile | None:
        row = self.store.query_one("SELECT profile_id FROM device_profiles WHERE device_id = ?", (device_id,))
        return self.get(row["profile_id"]) if row else None

    def rollout_targets(self, rollout_id: str) -> list[RolloutTarget]:
        if self.store.query_one("SELECT 1 FROM rollouts WHERE id = ?", (rollout_id,)) is None:
            raise RolloutNotFound(f"unknown rollout {rollout_id}")
        rows = self.store.query(
            "SELECT t.device_id, coalesce(p.profile_id, '') AS profile, t.variant, t.digest, t.skipped"
            " FROM rollout_targets t LEFT JOIN device_profiles p ON p.device_id = t.device_id"
            " WHERE t.rollout_id = ? ORDER BY t.device_id",
            (rollout_id,),
        )
        return [RolloutTarget(**r) for r in rows]

    def _ir_version(self, v: Variant) -> int:
        if v.format != "onnx" or not v.digest or self.registry is None:
            return 0
        return _ir_version_at(self.registry.artifacts.path(v.digest))

    def _other_tenants_bytes(self, device_id: str, tenant: str) -> int:
        row = self.store.query_one("SELECT desired FROM devices WHERE device_id = ?", (device_id,))
        if row is None or row["desired"] is None:
            return 0
        try:
            desired = decode_as(fleet_pb2.DesiredState, bytes(row["desired"]))
        except PayloadError:
            return 0
        return sum(int(m.artifact_size) for m in desired.models if tenant_or_default(m.tenant) != tenant)

    def target(self, device_id: str, found: ModelVersion, base: fleet_pb2.ModelAssignment) -> Targeted:
        """The assignment ``device_id`` should get for ``found``: ``base`` with the chosen variant, signed."""
        if found.stage == "archived":
            return Targeted(device_id, None, Choice(None, f"version {found.version} is archived"))
        profile = self.of_device(device_id)
        device = None
        if profile is not None:
            device = profile.device_class()
            # The budget is for every loaded model: what the device's other tenants run counts.
            others = self._other_tenants_bytes(device_id, base.tenant)
            device = replace(device, model_budget_bytes=device.model_budget_bytes - MEMORY_FACTOR * others)
        choice = choose(candidates(found, self._ir_version), device, found.sensor_kind)
        variant = found.variant(choice.variant) if choice.variant else None
        if variant is None:
            log.info(
                "device skipped device=%s model=%s version=%s reason=%s",
                device_id, found.name, found.version, choice.reason,
            )  # fmt: skip
            return Targeted(device_id, None, choice)
        wanted = fleet_pb2.ModelAssignment()
        wanted.CopyFrom(base)
        wanted.artifact_digest = variant.digest
        wanted.artifact_size = variant.size
        wanted.format = variant.format
        wanted.runtime = RUNTIME_FOR_FORMAT[variant.format]
        wanted.variant = variant.variant
        wanted.precision = variant.precision
        wanted.signature = bytes.fromhex(variant.signature)
        wanted.key_id = variant.key_id
        signer = self.registry.signer if self.registry is not None else None
        if (
            signer is not None
            and signer.rotation is not None
            and signer.rotation.new_key_id == variant.key_id
        ):
            wanted.key_rotation.CopyFrom(signer.rotation)
            wanted.earlier_rotations.extend(signer.earlier_rotations)
        log.info(
            "variant chosen device=%s model=%s version=%s variant=%s reason=%s",
            device_id, found.name, found.version, variant.variant, choice.reason,
        )  # fmt: skip
        return Targeted(device_id, wanted, choice)
