"""Models and their versions; every version is an ONNX artifact that loads.

An upload is staged in the artifact store, checked with onnx.checker and by
opening an onnxruntime session (the loader's own reason is the operator's
error message), and only then committed: a refused upload leaves nothing
behind.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import onnxruntime as ort

from controller.artifacts import ArtifactStore
from controller.errors import DuplicateKeyError, InvalidInputError, InvalidModel, ModelNotFound, VersionExists
from controller.store import Store

log = logging.getLogger(__name__)

FORMAT = "onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")

# onnxruntime's element type names -> numpy dtype names (the wire contract's spelling).
_DTYPES = {
    "float": "float32",
    "double": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "str",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


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


@dataclass(frozen=True)
class VersionSummary:
    version: str
    digest: str
    size: int
    created_at: float


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: list[VersionSummary] = field(default_factory=list)


def validate_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise InvalidInputError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', '+', '-', "
            "starting with a letter or digit"
        )
    return value


def _tensor_spec(arg: Any) -> TensorSpec:
    type_name: str = arg.type
    if not (type_name.startswith("tensor(") and type_name.endswith(")")):
        raise InvalidModel(f"{arg.name!r} is a {type_name}, not a tensor")
    element = type_name[len("tensor(") : -1]
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=_DTYPES.get(element, element), shape=shape)


def inspect_onnx(path: Path) -> Signature:
    """Check the file the way the agent will load it; raise InvalidModel with the loader's reason."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise InvalidModel(f"onnx.checker refused the model: {_first_line(exc)}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no public base class
        raise InvalidModel(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
    outputs = []
    for arg in session.get_outputs():
        try:
            outputs.append(_tensor_spec(arg))
        except InvalidModel as exc:
            raise InvalidModel(
                f"output {exc}; every output must be a tensor "
                "(for scikit-learn classifiers convert with options={id(model): {'zipmap': False}})"
            ) from None
    inputs = []
    for arg in session.get_inputs():
        try:
            inputs.append(_tensor_spec(arg))
        except InvalidModel as exc:
            raise InvalidModel(f"input {exc}; every input must be a tensor") from None
    return Signature(inputs=inputs, outputs=outputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def _specs(raw: str) -> list[TensorSpec]:
    return [TensorSpec(**item) for item in json.loads(raw)]


def _version_from_row(row: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        name=row["name"],
        version=row["version"],
        digest=row["digest"],
        size=row["size"],
        format=row["format"],
        inputs=_specs(row["inputs"]),
        outputs=_specs(row["outputs"]),
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
    )


class Registry:
    def __init__(self, store: Store, artifacts: ArtifactStore, max_upload_bytes: int) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_upload_bytes = max_upload_bytes

    def upload(self, name: str, version: str, source: BinaryIO, metadata: dict[str, Any]) -> ModelVersion:
        validate_name("model name", name)
        validate_name("version", version)
        if self.find(name, version) is not None:
            raise VersionExists(f"model {name} version {version} already exists")
        with self.artifacts.stage(source, self.max_upload_bytes) as staged:
            if staged.size == 0:
                raise InvalidModel("the uploaded file is empty")
            signature = inspect_onnx(staged.path)
            now = time.time()
            try:
                with self.store.transaction() as tx:
                    tx.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (name, now))
                    tx.execute(
                        "INSERT INTO model_versions (name, version, digest, size, format, inputs, outputs,"
                        " metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            version,
                            staged.digest,
                            staged.size,
                            FORMAT,
                            json.dumps([s.__dict__ for s in signature.inputs]),
                            json.dumps([s.__dict__ for s in signature.outputs]),
                            json.dumps(metadata),
                            now,
                        ),
                    )
                    # Inside the transaction: if the rename fails, the row is rolled back.
                    self.artifacts.commit(staged, FORMAT)
            except DuplicateKeyError:
                raise VersionExists(f"model {name} version {version} already exists") from None
        log.info(
            "model version registered model=%s version=%s digest=%s size=%d",
            name,
            version,
            staged.digest,
            staged.size,
        )
        return self.get(name, version)

    def find(self, name: str, version: str) -> ModelVersion | None:
        row = self.store.query_one(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        )
        return _version_from_row(row) if row else None

    def get(self, name: str, version: str) -> ModelVersion:
        found = self.find(name, version)
        if found is None:
            raise ModelNotFound(f"model {name} has no version {version}")
        return found

    def all(self) -> list[ModelSummary]:
        models = self.store.query("SELECT name FROM models ORDER BY name")
        versions = self.store.query(
            "SELECT name, version, digest, size, created_at FROM model_versions ORDER BY name, created_at, version"
        )
        by_name: dict[str, list[VersionSummary]] = {m["name"]: [] for m in models}
        for v in versions:
            by_name.setdefault(v["name"], []).append(
                VersionSummary(
                    version=v["version"], digest=v["digest"], size=v["size"], created_at=v["created_at"]
                )
            )
        return [ModelSummary(name=n, versions=vs) for n, vs in by_name.items()]
