"""Quantized variants, produced and validated in the background.

An upload with a calibration set (a .npz of named inputs) leaves ``pending``
variants in the registry; :class:`Optimizer` runs one worker thread that takes
versions off a queue and, per pending variant, quantizes the fp32 reference
with onnxruntime.quantization (static int8 QDQ from the calibration set, with
per-channel weights when that agrees better; or dynamic int8), validates it
against the reference on the same set, measures its latency here, and marks it
``ready`` or ``rejected`` with the reason. A restart resumes what was pending.

:func:`validate` is pure: top-1 agreement for classifiers, maximum and mean
absolute deviation otherwise (gated on ``1 - mean |dev| / mean |reference|``).
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from controller.calibration import CalibrationSet, load_calibration
from controller.errors import OptimizeError
from controller.model_runner import Runner
from controller.onnx_preparation import prepare
from controller.registry import (
    DYNAMIC_INT8,
    FP16,
    PRODUCED_PRECISION,
    STATIC_INT8,
    ModelVersion,
    Registry,
    Variant,
)
from controller.streaming import feedback, state_pairs

log = logging.getLogger(__name__)

# Enough samples to fix the activation ranges of a small model; the whole set
# (up to VALIDATION_SAMPLES) is used to validate.
CALIBRATION_SAMPLES = 64
VALIDATION_SAMPLES = 512
# Starts of one variant's production (across controller restarts) before it is given up.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Validation:
    passed: bool
    report: dict[str, Any]
    reason: str


def validate(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], task: str, gate: float
) -> Validation:
    """Compare a variant's outputs with the reference's (same order, same samples)."""
    if len(reference) != len(candidate):
        return Validation(
            False, {}, f"the variant has {len(candidate)} outputs, the reference {len(reference)}"
        )
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        if r.shape != c.shape:
            return Validation(
                False, {}, f"output {i} has shape {list(c.shape)}, the reference {list(r.shape)}"
            )
    report: dict[str, Any] = {
        "task": task,
        "gate": gate,
        "samples": int(reference[0].shape[0]) if reference[0].ndim else 1,
    }
    deviations = [
        np.abs(r.astype(np.float64) - c.astype(np.float64))
        for r, c in zip(reference, candidate, strict=True)
        if r.dtype.kind == "f"
    ]
    if deviations:
        report["max_abs_deviation"] = float(max(d.max() for d in deviations))
        report["mean_abs_deviation"] = float(np.mean([d.mean() for d in deviations]))
    if task == "classifier":
        agreement = _top1_agreement(reference[0], candidate[0])
        report["top1_agreement"] = agreement
        if agreement < gate:
            return Validation(False, report, f"top-1 agreement {agreement:.2%} is below the gate {gate:.2%}")
        return Validation(True, report, "")
    if not deviations:
        return Validation(False, report, "no float output to compare")
    scale = float(np.mean([np.abs(r.astype(np.float64)).mean() for r in reference if r.dtype.kind == "f"]))
    agreement = (
        1.0 - report["mean_abs_deviation"] / scale if scale > 0 else float(report["mean_abs_deviation"] == 0)
    )
    report["relative_agreement"] = agreement
    if agreement < gate:
        return Validation(
            False,
            report,
            f"1 - mean |deviation| / mean |reference| is {agreement:.2%}, below the gate {gate:.2%}",
        )
    return Validation(True, report, "")


def _top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.dtype.kind in "iu" or reference.ndim == 1:
        same = reference.reshape(len(reference), -1) == candidate.reshape(len(candidate), -1)
        return float(np.mean(np.all(same, axis=1)))
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)))


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, calibration: CalibrationSet) -> None:
        count = min(CALIBRATION_SAMPLES, calibration.count)
        self._items = iter([calibration.feed(i) for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize(
    kind: str,
    source: Path,
    target: Path,
    calibration: CalibrationSet | Mapping[str, np.ndarray] | None,
    per_channel: bool,
) -> dict[str, object]:
    """Write the ``kind`` variant (static QDQ int8, dynamic int8 or fp16) to ``target``; OptimizeError
    on failure. The source is first made ready for the tools (:mod:`controller.onnx_preparation`);
    returns what that did, for the variant's report."""
    if calibration is not None and not isinstance(calibration, CalibrationSet):
        calibration = CalibrationSet.stacked(calibration)
    prepared = target.with_name(f"{target.stem}.prepared.onnx")
    try:
        done = prepare_for(kind, source, prepared)
        convert(kind, prepared, target, calibration, per_channel)
        return done
    finally:
        prepared.unlink(missing_ok=True)


def prepare_for(kind: str, source: Path, target: Path) -> dict[str, object]:
    """``source`` made ready for the ``kind`` conversion, at ``target``; returns what was done."""
    try:
        return prepare(source, target, pre_process=kind != FP16)
    except Exception as exc:  # onnx raises whatever its loader and converters raise
        raise OptimizeError(f"preparing the model for quantization failed: {_reason(exc)}") from None


def convert(
    kind: str, source: Path, target: Path, calibration: CalibrationSet | None, per_channel: bool
) -> None:
    """Write the ``kind`` variant of an already prepared ``source``; OptimizeError on failure."""
    try:
        _convert(kind, source, target, calibration, per_channel)
    except OptimizeError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises whatever its passes raise
        raise OptimizeError(f"onnxruntime.quantization failed: {str(exc).strip()[:1000]}") from None


def _convert(
    kind: str, source: Path, target: Path, calibration: CalibrationSet | None, per_channel: bool
) -> None:
    if kind == STATIC_INT8:
        if calibration is None:
            raise OptimizeError("static int8 needs a calibration set")
        quantize_static(
            source,
            target,
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    elif kind == DYNAMIC_INT8:
        # Subgraphs too (silero-vad keeps its weights in If branches); only the dynamic
        # quantizer can reach them.
        quantize_dynamic(
            source,
            target,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"EnableSubgraph": True},
        )
    elif kind == FP16:
        # Inputs and outputs stay float32, so apps feed the fp16 variant like the reference.
        half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(_sorted(half), str(target))
    else:
        raise OptimizeError(f"unknown variant kind {kind!r}")


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order: the fp16 converter appends its input casts at the end."""
    graph = model.graph
    ready = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), list[onnx.NodeProto]()
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise OptimizeError("the fp16 graph has a cycle or an input nothing produces")
        for node in runnable:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            ordered.append(copy)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


@dataclass(frozen=True)
class Workload:
    """What every variant of a version is run on: the calibration samples, as independent
    samples, or for a stateful model as one stream with the state carried from step to step
    (:mod:`controller.streaming`)."""

    samples: list[list[np.ndarray]]
    # {input index: index of the output fed back into it}; empty for a stateless model.
    feedback: dict[int, int]
    pairs: dict[str, str]

    @classmethod
    def of(cls, found: ModelVersion, samples: list[list[np.ndarray]]) -> Workload:
        return cls(samples, feedback(found.signature), state_pairs(found.signature))

    def outputs(self, runner: Runner) -> list[np.ndarray]:
        if self.feedback:
            return runner.run_sequence(self.samples, self.feedback)
        return runner.run_all(self.samples)

    def report(self) -> dict[str, Any]:
        return {"streaming": {"state": self.pairs, "steps": len(self.samples)}} if self.pairs else {}


# -- the background worker ---------------------------------------------------------


class Optimizer:
    def __init__(self, registry: Registry, work_dir: Path) -> None:
        self.registry = registry
        self.work_dir = work_dir
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        # The reference made ready for int8 (True) or fp16 (False) while one version is
        # processed: pre-processing runs once per version, not once per attempt.
        self._preparations: dict[bool, tuple[Path, dict[str, object]]] = {}

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="optimizer", daemon=True)
        self._thread.start()
        for name, version in self.registry.unfinished():
            log.info("variants resumed model=%s version=%s", name, version)
            self.submit(name, version)

    def submit(self, name: str, version: str) -> None:
        self._idle.clear()
        self._jobs.put((name, version))

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self.process(*job)
            except Exception:
                log.exception("variant production crashed model=%s version=%s", *job)
            if self._jobs.empty():
                self._idle.set()

    def process(self, name: str, version: str) -> None:
        """Measure, produce and validate everything this version still lacks. Whatever goes
        wrong ends each unfinished variant ``failed`` with the reason: none stays pending."""
        found = self.registry.find(name, version)
        if found is None:
            return
        try:
            self._process(found)
        # onnxruntime and LiteRT raise their own types; any escape is this version's reason.
        except Exception as exc:
            self._fail_unfinished(name, version, f"variant production stopped: {_reason(exc)}")
            raise
        finally:
            for path, _ in self._preparations.values():
                path.unlink(missing_ok=True)
            self._preparations.clear()

    def _prepared(self, kind: str, ref_path: Path) -> tuple[Path, dict[str, object]]:
        """The reference prepared for ``kind`` (made on first use for this version)."""
        key = kind != FP16
        if key not in self._preparations:
            path = self.work_dir / f"prepared-{uuid.uuid4().hex}.onnx"
            try:
                done = prepare_for(kind, ref_path, path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self._preparations[key] = (path, done)
        return self._preparations[key]

    def _process(self, found: ModelVersion) -> None:
        name, version = found.name, found.version
        self.work_dir.mkdir(parents=True, exist_ok=True)
        reference = found.variant(next(v.variant for v in found.variants if v.digest == found.digest))
        assert reference is not None
        try:
            calibration = (
                load_calibration(self.registry.calibration_path(found.calibration_digest), found.signature)
                if found.calibration_digest
                else None
            )
        except Exception as exc:
            self._fail_unfinished(name, version, f"the calibration set cannot be used: {_reason(exc)}")
            return
        order = [s.name for s in found.inputs]
        ref_path = self.registry.artifacts.path(reference.digest)
        try:
            ref_runner = Runner(ref_path, reference.format)
        except Exception as exc:
            self._fail_unfinished(name, version, f"the uploaded model does not load here: {_reason(exc)}")
            return
        for v in found.variants:
            if v.status == "ready" and v.latency_ms is None:
                runner = (
                    ref_runner if v is reference else Runner(self.registry.artifacts.path(v.digest), v.format)
                )
                self._measure(found, v, runner, calibration.sample(0, order) if calibration else _zeros(v))
        unfinished = [v for v in found.variants if v.status in ("pending", "running")]
        if calibration is None or not unfinished:
            return
        workload = Workload.of(found, calibration.samples(order, VALIDATION_SAMPLES))
        try:
            expected = workload.outputs(ref_runner)
        except Exception as exc:
            self._fail_unfinished(
                name,
                version,
                "the uploaded model fails on the calibration set, so no variant can be validated: "
                + _reason(exc),
            )
            return
        for variant in unfinished:
            # Counted before the work: a quantizer that kills the controller (a native crash
            # on a hostile file) is tried MAX_ATTEMPTS times across restarts, not forever.
            attempts = int(variant.report.get("attempts", 0)) + 1
            if attempts > MAX_ATTEMPTS:
                reason = (
                    f"variant production was interrupted {MAX_ATTEMPTS} times (the controller stopped "
                    "while producing it); not tried again"
                )
                self.registry.set_variant_state(name, version, variant.variant, "failed", 1.0, reason)
                log.error(
                    "variant failed model=%s version=%s variant=%s reason=%s",
                    name,
                    version,
                    variant.variant,
                    reason,
                )
                continue
            progress = {**variant.report, "attempts": attempts}
            self.registry.set_variant_state(name, version, variant.variant, "running", 0.05, "", progress)
            variant = replace(variant, report=progress)
            try:
                self._produce(found, variant, ref_path, calibration, workload, expected)
            # onnxruntime and LiteRT raise their own types: any failure becomes this variant's reason.
            except Exception as exc:
                self.registry.set_variant_state(name, version, variant.variant, "failed", 1.0, _reason(exc))
                log.error(
                    "variant failed model=%s version=%s variant=%s reason=%s",
                    name,
                    version,
                    variant.variant,
                    exc,
                )

    def _fail_unfinished(self, name: str, version: str, reason: str) -> None:
        found = self.registry.find(name, version)
        for v in found.variants if found is not None else []:
            if v.status in ("pending", "running"):
                self.registry.set_variant_state(name, version, v.variant, "failed", 1.0, reason)
                log.error(
                    "variant failed model=%s version=%s variant=%s reason=%s",
                    name,
                    version,
                    v.variant,
                    reason,
                )

    def _measure(
        self, found: ModelVersion, variant: Variant, runner: Runner, sample: list[np.ndarray]
    ) -> None:
        try:
            latency = runner.latency_ms(sample)
        except Exception as exc:  # a model that loads but cannot run this sample: say so, keep going
            log.warning(
                "latency not measured model=%s version=%s variant=%s reason=%s",
                found.name, found.version, variant.variant, exc,
            )  # fmt: skip
            return
        self.registry.set_variant_state(
            found.name, found.version, variant.variant, variant.status, variant.progress, variant.reason,
            latency_ms=latency,
        )  # fmt: skip

    def _produce(
        self,
        found: ModelVersion,
        variant: Variant,
        ref_path: Path,
        calibration: CalibrationSet,
        workload: Workload,
        expected: list[np.ndarray],
    ) -> None:
        name, version, kind = found.name, found.version, variant.variant
        state = self.registry.set_variant_state
        if variant.source == "uploaded":
            state(name, version, kind, "running", 0.5)
            path = self.registry.artifacts.path(variant.digest)
            outputs = workload.outputs(Runner(path, variant.format))
            checked = validate(expected, outputs, found.task, found.gate)
            # What the upload found (quantization parameters, weight storage) stays beside the figures.
            report = {**variant.report, **checked.report, **workload.report()}
        else:
            checked, produced, per_channel, prepared = self._quantize_best(
                found, kind, ref_path, calibration, workload, expected
            )
            report = {
                "attempts": variant.report.get("attempts", 1),
                **checked.report,
                **workload.report(),
                **({"per_channel": per_channel} if kind != FP16 else {}),
                **({"preparation": prepared} if prepared else {}),
            }
            try:
                stored = self.registry.attach_artifact(name, version, kind, produced)
            finally:
                produced.unlink(missing_ok=True)
            if stored.precision != PRODUCED_PRECISION[kind]:
                op_types = {n.op_type for n in onnx.load(str(ref_path)).graph.node}
                reason = (
                    f"no operator of this model could be converted to {PRODUCED_PRECISION[kind]} "
                    f"({', '.join(sorted(op_types))})"
                )
                if op_types & {"If", "Loop", "Scan"}:
                    reason += (
                        "; the static quantizer leaves the weights inside If/Loop/Scan subgraphs as they are"
                    )
                state(name, version, kind, "rejected", 1.0, reason, report)
                return
            path = self.registry.artifacts.path(stored.digest)
        state(name, version, kind, "running", 0.9, "", report)
        latency = Runner(path, variant.format).latency_ms(workload.samples[0])
        status = "ready" if checked.passed else "rejected"
        state(name, version, kind, status, 1.0, checked.reason, report, latency)
        log.info(
            "variant %s model=%s version=%s variant=%s latency_ms=%.3f report=%s reason=%s",
            status, name, version, kind, latency, report, checked.reason or "-",
        )  # fmt: skip

    def _quantize_best(
        self,
        found: ModelVersion,
        kind: str,
        ref_path: Path,
        calibration: CalibrationSet,
        workload: Workload,
        expected: list[np.ndarray],
    ) -> tuple[Validation, Path, bool, dict[str, object]]:
        """Per-channel weights first; per-tensor too when per-channel misses the gate or fails
        (onnxruntime's per-channel bias adjustment breaks on some fused Gemm biases). Keeps the
        better (validation, file in the work folder, per_channel, what preparing the source did,
        with the per-channel failure if any); the other file is removed."""
        best: tuple[Validation, Path, bool] | None = None
        prepared: dict[str, object] = {}
        modes = (True, False) if kind != FP16 else (False,)
        for step, per_channel in enumerate(modes):
            self.registry.set_variant_state(found.name, found.version, kind, "running", 0.1 + 0.4 * step)
            target = self.work_dir / f"{kind}-{uuid.uuid4().hex}.onnx"
            try:
                source, done = self._prepared(kind, ref_path)
                prepared = {**prepared, **done}
                convert(kind, source, target, calibration, per_channel)
                checked = validate(expected, workload.outputs(Runner(target, "onnx")), found.task, found.gate)
            except Exception as exc:
                target.unlink(missing_ok=True)
                if per_channel and step + 1 < len(modes):
                    prepared["per_channel_failed"] = _reason(exc)
                    continue
                if best is not None:
                    best[1].unlink(missing_ok=True)
                raise
            except BaseException:
                target.unlink(missing_ok=True)
                if best is not None:
                    best[1].unlink(missing_ok=True)
                raise
            if best is None or _score(checked) > _score(best[0]):
                if best is not None:
                    best[1].unlink(missing_ok=True)
                best = (checked, target, per_channel)
            else:
                target.unlink(missing_ok=True)
            if best[0].passed:
                break
        assert best is not None
        return (*best, prepared)


def _reason(exc: BaseException) -> str:
    """The runtime's own words, short enough for the API and ``models show``."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


def _score(v: Validation) -> tuple[bool, float]:
    agreement = v.report.get("top1_agreement", v.report.get("relative_agreement", 0.0))
    return v.passed, float(agreement)


def _zeros(variant: Variant) -> list[np.ndarray]:
    """A sample for latency when there is no calibration set: zeros of the input signature."""
    return [
        np.zeros([d if d > 0 else 1 for d in s.shape] or [1], dtype=np.dtype(s.dtype)) for s in variant.inputs
    ]
