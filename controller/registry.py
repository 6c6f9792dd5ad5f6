"""Models, their versions and each version's artifact variants.

An upload is staged in the artifact store, checked the way a device will load
it (:mod:`controller.inspection`), and only then committed: a refused upload
leaves nothing behind. Calibration sets are checked by :mod:`controller.calibration`.

A version is immutable once registered: its lineage (parent version, training
data set digest, code version, metrics) and its uploaded artifact never change;
only its stage moves (see :data:`STAGE_TRANSITIONS`) and variants are added.
The uploaded artifact is the reference variant; quantized variants are queued
as ``pending`` and produced in the background by :mod:`controller.optimize`.
Every variant's manifest is signed by the controller's key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from controller.artifacts import ArtifactStore, StagedArtifact
from controller.calibration import MAX_CALIBRATION_BYTES, load_calibration
from controller.errors import (
    ConflictError,
    DuplicateKeyError,
    InvalidInputError,
    InvalidModel,
    ModelNotFound,
    TooLargeError,
    VersionExists,
)
from controller.inspection import FORMAT as FORMAT  # re-exported: rollouts name the format
from controller.inspection import Inspected, TensorSpec
from controller.model_check import check_artifact
from controller.onnx_compat import lowered_ir, min_onnxruntime, write_lowered
from controller.samples import MAX_SAMPLE_BYTES, SAMPLE_FORMAT, UPLOADED, Samples, prepared_samples
from controller.settings import DEFAULT_MAX_MODEL_MEMORY_BYTES
from controller.signature import TASKS, ModelSignature, check_signature, infer_signature
from controller.signing import Signer
from controller.store import Store

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
# Model names and versions, for request schemas.
NAME_PATTERN = _NAME.pattern

# onnxruntime's element type names -> numpy dtype names (the wire contract's spelling).
STAGES = ("development", "staging", "production", "archived")
# (from, to) pairs an operator may ask for; promoting to production archives
# the model's previous production version.
STAGE_TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("development", "staging"),
        ("development", "production"),
        ("development", "archived"),
        ("staging", "production"),
        ("staging", "development"),
        ("staging", "archived"),
        ("production", "staging"),
        ("production", "archived"),
        ("archived", "development"),
        ("archived", "staging"),
    }
)
SENSOR_KINDS = ("", "camera", "microphone", "sensor")
DEFAULT_GATE = 0.99
VARIANT_STATUSES = ("pending", "running", "ready", "rejected", "failed")
# The source of a variant that is its version's upload at a lower ONNX IR version.
LOWERED = "lowered"
STATIC_INT8 = "onnx-int8-static"
DYNAMIC_INT8 = "onnx-int8-dynamic"
FP16 = "onnx-fp16"
# The precision each produced variant must end up in.
PRODUCED_PRECISION = {STATIC_INT8: "int8", DYNAMIC_INT8: "int8", FP16: "fp16"}


@dataclass(frozen=True)
class Lineage:
    parent_version: str = ""
    dataset_digest: str = ""
    code_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadOptions:
    """Everything about a version besides its file and metadata."""

    lineage: Lineage = field(default_factory=Lineage)
    # "classifier" (gate on top-1 agreement) or "regression" (gate on relative
    # deviation); empty: what the signature's output meanings say (ModelSignature.task),
    # which follows an edited signature.
    task: str = ""
    # Which kind of sensor feeds the first input: "camera", "microphone", "sensor" or "".
    sensor_kind: str = ""
    gate: float = DEFAULT_GATE
    # Also produce a dynamic int8 variant (the static one comes with a calibration set).
    dynamic: bool = False
    # Also produce an fp16 variant (inputs and outputs stay float32), for GPUs and NPUs.
    fp16: bool = False


@dataclass(frozen=True)
class Variant:
    name: str
    version: str
    variant: str
    format: str
    precision: str
    # "uploaded", "quantized", or "lowered" (the upload at a lower ONNX IR version).
    source: str
    status: str
    progress: float
    digest: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
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


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    digest: str
    size: int
    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, Any]
    created_at: float
    lineage: Lineage = field(default_factory=Lineage)
    stage: str = "development"
    task: str = ""
    sensor_kind: str = ""
    gate: float = DEFAULT_GATE
    calibration_digest: str = ""
    variants: list[Variant] = field(default_factory=list)
    # What each input and output is (controller.signature), and the sample inputs
    # (an artifact: "uploaded", or "synthesized" from the signature) devices smoke-test with.
    signature: ModelSignature = field(default_factory=lambda: ModelSignature([], []))
    sample_digest: str = ""
    sample_size: int = 0
    sample_count: int = 0
    sample_origin: str = ""

    def variant(self, variant: str) -> Variant | None:
        return next((v for v in self.variants if v.variant == variant), None)


@dataclass(frozen=True)
class _NewVersion:
    """A checked upload about to be registered: the model file, its signature and samples."""

    staged: StagedArtifact
    inspected: Inspected
    signature: ModelSignature
    sample: Samples
    sample_staged: StagedArtifact
    calibration_digest: str
    # The upload at a lower ONNX IR version, and that version (Registry._lowered_copy).
    lowered: tuple[StagedArtifact, int] | None = None


@dataclass(frozen=True)
class VersionSummary:
    version: str
    digest: str
    size: int
    created_at: float
    stage: str = "development"


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: list[VersionSummary] = field(default_factory=list)


def validate_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise InvalidInputError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', '+', '-', "
            "starting with a letter or digit"
        )
    return value


def _specs(raw: str) -> list[TensorSpec]:
    return [TensorSpec(**item) for item in json.loads(raw)]


def _dump_specs(specs: list[TensorSpec]) -> str:
    return json.dumps([asdict(s) for s in specs])


def _variant_from_row(row: dict[str, Any]) -> Variant:
    return Variant(
        name=row["name"],
        version=row["version"],
        variant=row["variant"],
        format=row["format"],
        precision=row["precision"],
        source=row["source"],
        status=row["status"],
        progress=row["progress"],
        digest=row["digest"],
        size=row["size"],
        inputs=_specs(row["inputs"]),
        outputs=_specs(row["outputs"]),
        opset=row["opset"],
        runtime=row["runtime"],
        runtime_version=row["runtime_version"],
        latency_ms=row["latency_ms"],
        report=json.loads(row["report"]),
        reason=row["reason"],
        signature=bytes(row["signature"]).hex() if row["signature"] else "",
        key_id=row["key_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _version_from_row(
    row: dict[str, Any],
    details: dict[str, Any] | None,
    variants: list[Variant],
    described: dict[str, Any] | None,
) -> ModelVersion:
    inputs, outputs = _specs(row["inputs"]), _specs(row["outputs"])
    extra: dict[str, Any] = {}
    if described is not None:
        extra = {
            "signature": ModelSignature.from_json(json.loads(described["signature"])),
            "sample_digest": described["sample_digest"],
            "sample_size": described["sample_size"],
            "sample_count": described["sample_count"],
            "sample_origin": described["sample_origin"],
        }
    else:
        # A version registered before signatures were stored: the one inference, on read.
        extra = {"signature": infer_signature(inputs, outputs)}
    if details is not None:
        extra |= {
            "lineage": Lineage(
                parent_version=details["parent_version"],
                dataset_digest=details["dataset_digest"],
                code_version=details["code_version"],
                metrics=json.loads(details["metrics"]),
            ),
            "stage": details["stage"],
            "task": details["task"] or extra["signature"].task(),
            "sensor_kind": details["sensor_kind"],
            "gate": details["gate"],
            "calibration_digest": details["calibration_digest"],
        }
    return ModelVersion(
        name=row["name"],
        version=row["version"],
        digest=row["digest"],
        size=row["size"],
        format=row["format"],
        inputs=inputs,
        outputs=outputs,
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        variants=variants,
        **extra,
    )


def _per_sample(spec: TensorSpec, batch_axis: int) -> int:
    """Values per sample (all but the signature's batch axis, -1: none); 0 when a dimension is free."""
    dims = [d for i, d in enumerate(spec.shape) if i != batch_axis]
    return 0 if any(d < 0 for d in dims) else math.prod(dims)


def newest_signature(store: Store, model: str) -> ModelSignature | None:
    """The signature of ``model``'s newest version (what a tenant running the model is
    checked against); None when the model has no version."""
    row = store.query_one(
        "SELECT v.inputs, v.outputs, s.signature FROM model_versions v LEFT JOIN version_signatures s"
        " ON s.name = v.name AND s.version = v.version WHERE v.name = ? ORDER BY v.created_at DESC LIMIT 1",
        (model,),
    )
    if row is None:
        return None
    if row["signature"] is not None:
        return ModelSignature.from_json(json.loads(row["signature"]))
    return infer_signature(_specs(row["inputs"]), _specs(row["outputs"]))


def variant_name(fmt: str, precision: str) -> str:
    return f"{fmt}-{precision}"


def reference_note(inspected: Inspected, calibration_digest: str) -> dict[str, Any]:
    """The uploaded variant's report: what its calibration set will (and will not) be used for."""
    note: dict[str, Any] = {"reference": True}
    if calibration_digest and inspected.format != FORMAT:
        note["variants"] = (
            f"none produced from a {inspected.format} file; uploaded variants are validated "
            "against this one on the calibration set, which also gives the drift baseline"
        )
    return note


class Registry:
    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        max_upload_bytes: int,
        signer: Signer | None = None,
        max_model_memory_bytes: int = DEFAULT_MAX_MODEL_MEMORY_BYTES,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_upload_bytes = max_upload_bytes
        self.max_model_memory_bytes = max_model_memory_bytes
        self.signer = signer or Signer.load_or_create(artifacts.root.parent / "signing")
        self.calibration_dir = artifacts.root.parent / "calibration"
        # Called with (name, version) after a version or variant is committed: the
        # optimizer measures latency and produces or validates pending variants.
        self.on_added: Callable[[str, str], None] | None = None
        self._remove_partial_uploads()

    # -- upload -------------------------------------------------------------

    def upload(
        self,
        name: str,
        version: str,
        source: BinaryIO,
        metadata: dict[str, Any],
        options: UploadOptions | None = None,
        calibration: BinaryIO | None = None,
        samples: BinaryIO | None = None,
        signature: ModelSignature | None = None,
    ) -> ModelVersion:
        """Register a version. ``signature`` corrects the one inferred from the model;
        ``samples`` (an .npz of named inputs) are checked against it, else one sample is
        synthesized; the model must run on the first (:mod:`controller.samples`)."""
        options = options or UploadOptions()
        validate_name("model name", name)
        validate_name("version", version)
        self._check_options(name, options)
        if self.find(name, version) is not None:
            raise VersionExists(f"model {name} version {version} already exists")
        with self.artifacts.stage(source, self.max_upload_bytes) as staged:
            if staged.size == 0:
                raise InvalidModel("the uploaded file is empty")
            inspected = self._check(staged.path)
            described = self._described(inspected, signature)
            # Without samples, a calibration set is the operator's samples; without one, the
            # samples calibrate: either is a set of real inputs in the model's own shapes.
            own_samples, own_calibration = samples or calibration, calibration if samples else None
            with prepared_samples(
                own_samples,
                described,
                staged.path,
                self.max_model_memory_bytes,
                self.calibration_dir,
                "sample" if samples else "calibration",
            ) as sample:
                calibration_digest = ""
                if own_calibration is not None:
                    calibration_digest = self._store_calibration(own_calibration, described)
                elif sample.raw is not None:
                    with sample.raw.open("rb") as raw:
                        calibration_digest = self._store_calibration(raw, described)
                pending = self._pending_variants(inspected, options, calibration_digest)
                with (
                    sample.path.open("rb") as sample_file,
                    self.artifacts.stage(sample_file, MAX_SAMPLE_BYTES) as sample_staged,
                    self._lowered_copy(staged, inspected) as lowered,
                ):
                    new = _NewVersion(
                        staged,
                        inspected,
                        sample.signature,
                        sample,
                        sample_staged,
                        calibration_digest,
                        lowered,
                    )
                    self._insert_version(name, version, metadata, options, new, pending)
        log.info(
            "model version registered model=%s version=%s digest=%s size=%d format=%s precision=%s pending=%s"
            " samples=%s",
            name, version, staged.digest, staged.size, inspected.format, inspected.precision, ",".join(pending),
            sample.origin,
        )  # fmt: skip
        if self.on_added is not None:
            self.on_added(name, version)
        return self.get(name, version)

    def _insert_version(
        self,
        name: str,
        version: str,
        metadata: dict[str, Any],
        options: UploadOptions,
        new: _NewVersion,
        pending: list[str],
    ) -> None:
        staged, inspected, calibration_digest = new.staged, new.inspected, new.calibration_digest
        # Stored as the operator gave it; "" reads the signature's output meanings.
        task = options.task
        now = time.time()
        reference = variant_name(inspected.format, inspected.precision)
        try:
            with self.store.transaction() as tx:
                tx.execute(
                    "INSERT INTO models (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, now)
                )
                tx.execute(
                    "INSERT INTO model_versions (name, version, digest, size, format, inputs, outputs,"
                    " metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        version,
                        staged.digest,
                        staged.size,
                        inspected.format,
                        _dump_specs(inspected.signature.inputs),
                        _dump_specs(inspected.signature.outputs),
                        json.dumps(metadata),
                        now,
                    ),
                )
                lineage = options.lineage
                tx.execute(
                    "INSERT INTO version_details (name, version, parent_version, dataset_digest, code_version,"
                    " metrics, task, sensor_kind, gate, calibration_digest, stage, stage_changed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'development', ?)",
                    (
                        name,
                        version,
                        lineage.parent_version,
                        lineage.dataset_digest,
                        lineage.code_version,
                        json.dumps(lineage.metrics),
                        task,
                        options.sensor_kind,
                        options.gate,
                        calibration_digest,
                        now,
                    ),
                )
                self._insert_variant(
                    tx,
                    name,
                    version,
                    reference,
                    staged,
                    inspected,
                    "uploaded",
                    now,
                    note=reference_note(inspected, calibration_digest),
                )
                if new.lowered is not None:
                    self._insert_lowered(tx, name, version, reference, new, now)
                for variant in pending:
                    self._insert_pending(tx, name, version, variant, now)
                tx.execute(
                    "INSERT INTO version_signatures (name, version, signature, sample_digest, sample_size,"
                    " sample_count, sample_origin, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name, version, json.dumps(new.signature.to_json()), new.sample_staged.digest,
                        new.sample_staged.size, new.sample.count, new.sample.origin, now,
                    ),
                )  # fmt: skip
                # Inside the transaction: if a rename fails, the rows are rolled back.
                self.artifacts.commit(new.sample_staged, SAMPLE_FORMAT)
                self.artifacts.commit(staged, inspected.format)
        except DuplicateKeyError:
            raise VersionExists(f"model {name} version {version} already exists") from None

    def add_variant(self, name: str, version: str, source: BinaryIO) -> Variant:
        """Another artifact of an existing version (e.g. a TFLite export), checked like an upload."""
        found = self.get(name, version)
        with self.artifacts.stage(source, self.max_upload_bytes) as staged:
            if staged.size == 0:
                raise InvalidModel("the uploaded file is empty")
            inspected = self._check(staged.path)
            variant = variant_name(inspected.format, inspected.precision)
            if len(inspected.signature.inputs) != len(found.inputs) or len(
                inspected.signature.outputs
            ) != len(found.outputs):
                raise InvalidModel(
                    f"the variant has {len(inspected.signature.inputs)} inputs and "
                    f"{len(inspected.signature.outputs)} outputs, version {version} has "
                    f"{len(found.inputs)} and {len(found.outputs)}"
                )
            # Inputs match by position; each sample lies along the axis the version's signature says.
            axes = [role.batch_axis for role in found.signature.inputs]
            for i, (mine, theirs) in enumerate(zip(inspected.signature.inputs, found.inputs, strict=True)):
                have, want = _per_sample(mine, axes[i]), _per_sample(theirs, axes[i])
                if have and want and have != want:
                    raise InvalidModel(
                        f"input {i} takes {have} values per sample, version {version} takes {want}"
                    )
            now = time.time()
            # Validated against the reference in the background when there is a calibration set.
            status = "pending" if found.calibration_digest else "ready"
            note = (
                {}
                if found.calibration_digest
                else {"validated": False, "why": "the version has no calibration set"}
            )
            try:
                with self.store.transaction() as tx:
                    self._insert_variant(
                        tx, name, version, variant, staged, inspected, "uploaded", now, status, note
                    )
                    self.artifacts.commit(staged, inspected.format)
            except DuplicateKeyError:
                raise ConflictError(
                    f"model {name} version {version} already has a {variant} variant"
                ) from None
        log.info(
            "variant uploaded model=%s version=%s variant=%s digest=%s status=%s",
            name, version, variant, staged.digest, status,
        )  # fmt: skip
        if self.on_added is not None:
            self.on_added(name, version)
        found_variant = self.get(name, version).variant(variant)
        assert found_variant is not None
        return found_variant

    @staticmethod
    def _described(inspected: Inspected, given: ModelSignature | None) -> ModelSignature:
        """The operator's signature checked against the model, else the one inferred from it."""
        found = inspected.signature
        if given is None:
            return infer_signature(found.inputs, found.outputs)
        return check_signature(given, found.inputs, found.outputs)

    # -- signatures -------------------------------------------------------------------

    def set_signature(self, name: str, version: str, signature: ModelSignature) -> ModelVersion:
        """Replace a version's signature. It must fit the model and the stored samples; a
        synthesized sample is made again from it and must run. Nothing changes otherwise."""
        found = self.get(name, version)
        described = check_signature(signature, found.inputs, found.outputs)
        model = self.artifacts.path(found.digest)
        if found.sample_origin == UPLOADED:
            with (
                self.artifacts.path(found.sample_digest).open("rb") as own,
                prepared_samples(
                    own, described, model, self.max_model_memory_bytes, self.calibration_dir
                ) as sample,
            ):
                self._store_signature(found, sample)
        else:
            with prepared_samples(
                None, described, model, self.max_model_memory_bytes, self.calibration_dir
            ) as sample:
                self._store_signature(found, sample)
        log.info("signature changed model=%s version=%s", name, version)
        return self.get(name, version)

    def _store_signature(self, found: ModelVersion, sample: Samples) -> None:
        with (
            sample.path.open("rb") as sample_file,
            self.artifacts.stage(sample_file, MAX_SAMPLE_BYTES) as staged,
            self.store.transaction() as tx,
        ):
            tx.execute(
                "INSERT INTO version_signatures (name, version, signature, sample_digest, sample_size,"
                " sample_count, sample_origin, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name, version) DO UPDATE SET signature = excluded.signature,"
                " sample_digest = excluded.sample_digest, sample_size = excluded.sample_size,"
                " sample_count = excluded.sample_count, sample_origin = excluded.sample_origin,"
                " updated_at = excluded.updated_at",
                (
                    found.name, found.version, json.dumps(sample.signature.to_json()), staged.digest, staged.size,
                    sample.count, sample.origin, time.time(),
                ),
            )  # fmt: skip
            self.artifacts.commit(staged, SAMPLE_FORMAT)

    def _check(self, path: Path) -> Inspected:
        """Checked in a child process: the file never has to fit in the controller's memory."""
        return check_artifact(path, self.max_model_memory_bytes)

    def _remove_partial_uploads(self) -> None:
        """Uploads and calibration sets a killed controller left half-written (a running
        controller removes its own on every exit path)."""
        leftovers = [
            *self.artifacts.root.glob(".upload-*.tmp"),
            *self.artifacts.root.glob(".*.manifest.*.tmp"),
            *(self.calibration_dir.glob(".calibration-*.npz") if self.calibration_dir.is_dir() else []),
        ]
        for path in leftovers:
            path.unlink(missing_ok=True)
        # Sample inputs being checked (controller.samples) when the controller was killed.
        for folder in self.calibration_dir.glob(".samples-*") if self.calibration_dir.is_dir() else []:
            shutil.rmtree(folder, ignore_errors=True)
        if leftovers:
            log.info("partial uploads removed count=%d dir=%s", len(leftovers), self.artifacts.root)

    def _check_options(self, name: str, options: UploadOptions) -> None:
        if options.task and options.task not in TASKS:
            raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, not {options.task!r}")
        if options.sensor_kind not in SENSOR_KINDS:
            raise InvalidInputError(
                f"sensor must be one of {', '.join(k for k in SENSOR_KINDS if k)}, not {options.sensor_kind!r}"
            )
        if not (math.isfinite(options.gate) and 0 < options.gate <= 1):
            raise InvalidInputError(f"gate must be in (0, 1], got {options.gate}")
        parent = options.lineage.parent_version
        if parent and self.find(name, parent) is None:
            raise InvalidInputError(f"parent version {parent} of model {name} does not exist")
        digest = options.lineage.dataset_digest
        if digest and not re.match(r"^(sha256:)?[0-9a-f]{64}$", digest):
            raise InvalidInputError(f"dataset digest {digest!r} is not a sha256 (64 hex digits)")
        if not isinstance(options.lineage.metrics, dict):
            raise InvalidInputError("metrics must be a JSON object")

    @staticmethod
    def _pending_variants(inspected: Inspected, options: UploadOptions, calibration: str) -> list[str]:
        for wanted, what in ((options.dynamic, "a dynamic int8"), (options.fp16, "an fp16")):
            if wanted and inspected.format != FORMAT:
                # LiteRT runs .tflite files but does not rewrite them; ai-edge-quantizer leaves
                # fp16-stored weights (MediaPipe's) as they are and needs signature defs that
                # such files lack. Saying so beats ignoring the option.
                raise InvalidInputError(
                    f"{what} variant cannot be produced from a {inspected.format} file: the controller "
                    "quantizes ONNX models only; convert the model to that precision with your exporter "
                    "and upload it as a variant (POST /v1/models/{name}/versions/{version}/variants)"
                )
            if wanted and not calibration:
                raise InvalidInputError(f"{what} variant needs a calibration set to be validated on")
        if not calibration or inspected.format != FORMAT or inspected.precision != "fp32":
            return []
        return [STATIC_INT8] + [DYNAMIC_INT8] * options.dynamic + [FP16] * options.fp16

    def _store_calibration(self, source: BinaryIO, signature: ModelSignature) -> str:
        self.calibration_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".calibration-", suffix=".npz", dir=self.calibration_dir)
        tmp = Path(tmp_name)
        try:
            sha = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while data := source.read(1024 * 1024):
                    size += len(data)
                    if size > MAX_CALIBRATION_BYTES:
                        raise TooLargeError(f"calibration set exceeds {MAX_CALIBRATION_BYTES} bytes")
                    sha.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            load_calibration(tmp, signature)
            digest = sha.hexdigest()
            os.replace(tmp, self.calibration_path(digest))
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def calibration_path(self, digest: str) -> Path:
        return self.calibration_dir / f"{digest}.npz"

    def _insert_variant(
        self,
        tx: Store,
        name: str,
        version: str,
        variant: str,
        staged: StagedArtifact,
        inspected: Inspected,
        source: str,
        now: float,
        status: str = "ready",
        note: dict[str, Any] | None = None,
    ) -> None:
        signature = self.signer.sign_manifest(name, version, variant, staged.digest, staged.size)
        report: dict[str, Any] = dict(note or {})
        # Weights stored in another precision than the kernels compute in (fp16 weights
        # dequantized to float32): said beside ``precision``, which devices must support.
        if inspected.storage and inspected.storage != inspected.precision:
            report["storage"] = inspected.storage
        if inspected.quantization:
            report["quantization"] = inspected.quantization
        tx.execute(
            "INSERT INTO variants (name, version, variant, format, precision, source, status, progress, digest,"
            " size, inputs, outputs, opset, runtime, runtime_version, latency_ms, report, reason, signature,"
            " key_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, '',"
            " ?, ?, ?, ?)",
            (
                name, version, variant, inspected.format, inspected.precision, source, status,
                1.0 if status == "ready" else 0.0, staged.digest, staged.size,
                _dump_specs(inspected.signature.inputs), _dump_specs(inspected.signature.outputs),
                inspected.opset, inspected.runtime, inspected.runtime_version, json.dumps(report),
                signature, self.signer.key_id, now, now,
            ),
        )  # fmt: skip

    @contextmanager
    def _lowered_copy(
        self, staged: StagedArtifact, inspected: Inspected
    ) -> Iterator[tuple[StagedArtifact, int] | None]:
        """An ONNX upload stating an IR version newer than the oldest supported onnxruntime reads
        (onnx 1.23 writes 14 whatever the opset; onnxruntime 1.20 reads 10), copied at the lowest
        IR version its content needs and staged: devices whose runtime cannot read the upload get
        the copy, the same graph and weights. None when no copy helps (controller.onnx_compat)."""
        ir = (
            lowered_ir(inspected.ir_version, inspected.lowest_ir_version)
            if inspected.format == FORMAT
            else None
        )
        if ir is None:
            yield None
            return
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=self.artifacts.root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write_lowered(staged.path, tmp, ir)
            with tmp.open("rb") as copy, self.artifacts.stage(copy, staged.size + 16) as lowered:
                yield lowered, ir
        finally:
            tmp.unlink(missing_ok=True)

    def _insert_lowered(
        self, tx: Store, name: str, version: str, reference: str, new: _NewVersion, now: float
    ) -> None:
        assert new.lowered is not None
        copy, ir = new.lowered
        inspected = replace(
            new.inspected, ir_version=ir, runtime_version=min_onnxruntime(new.inspected.opset, ir)
        )
        note = {
            "lowered_from": reference,
            "ir_version": {"uploaded": new.inspected.ir_version, "lowered": ir},
            "why": f"onnxruntime releases before {new.inspected.runtime_version} cannot read the uploaded "
            f"file's IR version {new.inspected.ir_version}; its content needs {ir}",
        }
        self._insert_variant(
            tx, name, version, f"{reference}-ir{ir}", copy, inspected, LOWERED, now, note=note
        )
        self.artifacts.commit(copy, FORMAT)

    @staticmethod
    def _insert_pending(tx: Store, name: str, version: str, variant: str, now: float) -> None:
        tx.execute(
            "INSERT INTO variants (name, version, variant, format, precision, source, status, progress, digest,"
            " size, inputs, outputs, opset, runtime, runtime_version, latency_ms, report, reason, signature,"
            " key_id, created_at, updated_at) VALUES (?, ?, ?, 'onnx', ?, 'quantized', 'pending', 0, '',"
            " 0, '[]', '[]', 0, 'onnxruntime', '', NULL, '{}', '', NULL, '', ?, ?)",
            (name, version, variant, PRODUCED_PRECISION[variant], now, now),
        )

    # -- variants produced in the background ------------------------------------

    def unfinished(self) -> list[tuple[str, str]]:
        """Versions with variants still to produce or validate (a restart resumes them)."""
        rows = self.store.query(
            "SELECT name, version FROM variants WHERE status IN ('pending', 'running')"
            " GROUP BY name, version ORDER BY min(created_at), name, version"
        )
        return [(r["name"], r["version"]) for r in rows]

    def set_variant_state(
        self,
        name: str,
        version: str,
        variant: str,
        status: str,
        progress: float,
        reason: str = "",
        report: dict[str, Any] | None = None,
        latency_ms: float | None = None,
    ) -> None:
        assert status in VARIANT_STATUSES
        sets = "status = ?, progress = ?, reason = ?, updated_at = ?"
        params: list[Any] = [status, progress, reason, time.time()]
        if report is not None:
            sets += ", report = ?"
            params.append(json.dumps(report))
        if latency_ms is not None:
            sets += ", latency_ms = ?"
            params.append(latency_ms)
        self.store.execute(
            f"UPDATE variants SET {sets} WHERE name = ? AND version = ? AND variant = ?",
            [*params, name, version, variant],
        )

    def attach_artifact(self, name: str, version: str, variant: str, path: Path) -> Variant:
        """Store a produced file as the artifact of a pending variant (signed, inspected)."""
        with path.open("rb") as source, self.artifacts.stage(source, self.max_upload_bytes) as staged:
            inspected = self._check(staged.path)
            signature = self.signer.sign_manifest(name, version, variant, staged.digest, staged.size)
            with self.store.transaction() as tx:
                tx.execute(
                    "UPDATE variants SET format = ?, precision = ?, digest = ?, size = ?, inputs = ?, outputs = ?,"
                    " opset = ?, runtime = ?, runtime_version = ?, signature = ?, key_id = ?, updated_at = ?"
                    " WHERE name = ? AND version = ? AND variant = ?",
                    (
                        inspected.format, inspected.precision, staged.digest, staged.size,
                        _dump_specs(inspected.signature.inputs), _dump_specs(inspected.signature.outputs),
                        inspected.opset, inspected.runtime, inspected.runtime_version, signature,
                        self.signer.key_id, time.time(), name, version, variant,
                    ),
                )  # fmt: skip
                self.artifacts.commit(staged, inspected.format)
        found = self.get(name, version).variant(variant)
        assert found is not None
        return found

    def resign_all(self, signer: Signer) -> int:
        """Sign every variant with ``signer`` (after a key rotation); returns how many."""
        rows = self.store.query(
            "SELECT name, version, variant, digest, size FROM variants WHERE digest != ''"
        )
        with self.store.transaction() as tx:
            for r in rows:
                signature = signer.sign_manifest(
                    r["name"], r["version"], r["variant"], r["digest"], r["size"]
                )
                tx.execute(
                    "UPDATE variants SET signature = ?, key_id = ? WHERE name = ? AND version = ? AND variant = ?",
                    (signature, signer.key_id, r["name"], r["version"], r["variant"]),
                )
        self.signer = signer
        return len(rows)

    # -- stages, lookups, comparison ---------------------------------------------

    def set_stage(self, name: str, version: str, stage: str) -> ModelVersion:
        current = self.get(name, version)
        if stage not in STAGES:
            raise InvalidInputError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        if stage == current.stage:
            return current
        if (current.stage, stage) not in STAGE_TRANSITIONS:
            raise InvalidInputError(f"version {version} of {name} cannot go from {current.stage} to {stage}")
        now = time.time()
        with self.store.transaction() as tx:
            if stage == "production":
                tx.execute(
                    "UPDATE version_details SET stage = 'archived', stage_changed_at = ?"
                    " WHERE name = ? AND stage = 'production'",
                    (now, name),
                )
            tx.execute(
                "UPDATE version_details SET stage = ?, stage_changed_at = ? WHERE name = ? AND version = ?",
                (stage, now, name, version),
            )
        log.info("stage changed model=%s version=%s from=%s to=%s", name, version, current.stage, stage)
        return self.get(name, version)

    def find(self, name: str, version: str) -> ModelVersion | None:
        row = self.store.query_one(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        )
        if row is None:
            return None
        details = self.store.query_one(
            "SELECT * FROM version_details WHERE name = ? AND version = ?", (name, version)
        )
        variants = self.store.query(
            "SELECT * FROM variants WHERE name = ? AND version = ? ORDER BY source DESC, variant",
            (name, version),
        )
        described = self.store.query_one(
            "SELECT * FROM version_signatures WHERE name = ? AND version = ?", (name, version)
        )
        return _version_from_row(row, details, [_variant_from_row(v) for v in variants], described)

    def get(self, name: str, version: str) -> ModelVersion:
        found = self.find(name, version)
        if found is None:
            raise ModelNotFound(f"model {name} has no version {version}")
        return found

    def all(self) -> list[ModelSummary]:
        models = self.store.query("SELECT name FROM models ORDER BY name")
        versions = self.store.query(
            "SELECT v.name, v.version, v.digest, v.size, v.created_at, coalesce(d.stage, 'development') AS stage"
            " FROM model_versions v LEFT JOIN version_details d ON d.name = v.name AND d.version = v.version"
            " ORDER BY v.name, v.created_at, v.version"
        )
        by_name: dict[str, list[VersionSummary]] = {m["name"]: [] for m in models}
        for v in versions:
            by_name.setdefault(v["name"], []).append(
                VersionSummary(
                    version=v["version"],
                    digest=v["digest"],
                    size=v["size"],
                    created_at=v["created_at"],
                    stage=v["stage"],
                )
            )
        return [ModelSummary(name=n, versions=vs) for n, vs in by_name.items()]

    def compare(self, name: str, a: str, b: str) -> dict[str, Any]:
        """What differs between two versions: lineage, metrics (with deltas), signature, variants."""
        left, right = self.get(name, a), self.get(name, b)
        metrics: dict[str, dict[str, Any]] = {}
        for key in sorted(set(left.lineage.metrics) | set(right.lineage.metrics)):
            x, y = left.lineage.metrics.get(key), right.lineage.metrics.get(key)
            entry: dict[str, Any] = {a: x, b: y}
            if (
                isinstance(x, int | float)
                and isinstance(y, int | float)
                and not isinstance(x, bool)
                and not isinstance(y, bool)
            ):
                entry["delta"] = y - x
            metrics[key] = entry
        lineage = {
            key: {a: getattr(left.lineage, key), b: getattr(right.lineage, key)}
            for key in ("parent_version", "dataset_digest", "code_version")
            if getattr(left.lineage, key) != getattr(right.lineage, key)
        }
        variants = {
            v: {
                side.version: (
                    {
                        "size": found.size,
                        "latency_ms": found.latency_ms,
                        "status": found.status,
                        "digest": found.digest,
                    }
                    if (found := side.variant(v)) is not None
                    else None
                )
                for side in (left, right)
            }
            for v in sorted({x.variant for x in left.variants} | {x.variant for x in right.variants})
        }
        return {
            "name": name,
            "versions": [a, b],
            "stages": {a: left.stage, b: right.stage},
            "same_signature": (left.inputs, left.outputs) == (right.inputs, right.outputs),
            "same_artifact": left.digest == right.digest,
            "lineage": lineage,
            "metrics": metrics,
            "variants": variants,
            "b_descends_from_a": self._descends(name, b, a),
        }

    def _descends(self, name: str, child: str, ancestor: str) -> bool:
        seen: set[str] = set()
        current = child
        while current and current not in seen:
            seen.add(current)
            row = self.store.query_one(
                "SELECT parent_version FROM version_details WHERE name = ? AND version = ?", (name, current)
            )
            current = row["parent_version"] if row else ""
            if current == ancestor:
                return True
        return False
