"""Quantized variants, produced and validated in the background.

An upload with a calibration set (a .npz of named inputs) leaves ``pending``
variants in the registry; :class:`Optimizer` runs one worker thread that takes
versions off a queue and, per pending variant, quantizes the fp32 reference
with onnxruntime.quantization (static int8 QDQ from the calibration set, with
per-channel weights when that agrees better; or dynamic int8), validates it
against the reference on the same set, measures its latency, and marks it
``ready`` or ``rejected`` with the reason. A restart resumes what was pending.

The models are loaded and run only in a producer process whose memory is limited
(``MEMORY_FACTOR`` x ``max_model_memory_bytes``): the upload checks bound what a
model takes once loaded, not what it allocates on each sample of its calibration
set, nor what a quantizer does with it. A producer that runs out of memory or
crashes fails the variant it was producing with the reason; the controller goes on.

:func:`validate` is pure: top-1 agreement for classifiers, maximum and mean
absolute deviation otherwise (gated on ``1 - mean |dev| / mean |reference|``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
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
from controller.model_check import OUT_OF_MEMORY, limit_data_segment, process_context
from controller.model_memory import human
from controller.model_runner import Runner
from controller.onnx_compat import lower_in_place
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
from controller.signature import ModelSignature
from controller.streaming import feedback, state_pairs

log = logging.getLogger(__name__)

# Enough samples to fix the activation ranges of a small model; the whole set
# (up to VALIDATION_SAMPLES) is used to validate.
CALIBRATION_SAMPLES = 64
VALIDATION_SAMPLES = 512
# Starts of one variant's production (across controller restarts) before it is given up.
MAX_ATTEMPTS = 3
# A producer process may take this many times what one model may take once loaded.
MEMORY_FACTOR = 4
# One step of a producer (running the reference, producing one variant) may take this long.
PRODUCER_TIMEOUT_S = 1800.0
# An int8 variant quantizes most of its weights, or it is int8 in name only (see _record).
MIN_INT8_WEIGHT_SHARE = 0.5
# Tensors this large are weights; smaller ones are scales, zero points, shapes and constants.
WEIGHT_MIN_VALUES = 256
_WEIGHT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
)


@dataclass(frozen=True)
class Validation:
    passed: bool
    report: dict[str, Any]
    reason: str


def validate(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    task: str,
    gate: float,
    scores: int | None = None,
) -> Validation:
    """Compare a variant's outputs with the reference's (same order, same samples). A classifier
    is judged on top-1 agreement of output ``scores`` (the one the signature calls its scores;
    the first output when it calls none so and the operator chose ``classifier``)."""
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
        k = scores or 0
        agreement = _top1_agreement(reference[k], candidate[k])
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
    """Write the ``kind`` variant of an already prepared ``source``, at the lowest ONNX IR version
    its content needs (older runtimes read it; controller.onnx_compat); OptimizeError on failure."""
    try:
        _convert(kind, source, target, calibration, per_channel)
        lower_in_place(target)
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
    def of(cls, signature: ModelSignature, samples: list[list[np.ndarray]]) -> Workload:
        return cls(samples, feedback(signature), state_pairs(signature))

    def outputs(self, runner: Runner) -> list[np.ndarray]:
        if self.feedback:
            return runner.run_sequence(self.samples, self.feedback)
        return runner.run_all(self.samples)

    def report(self) -> dict[str, Any]:
        return {"streaming": {"state": self.pairs, "steps": len(self.samples)}} if self.pairs else {}


# -- the producer process ------------------------------------------------------------
#
# Everything that loads or runs a model (the reference, the quantizers, each candidate)
# runs in a producer process forked from the model checker's server, its data segment
# limited to ``memory_limit`` bytes beyond what it held when it started. The controller
# keeps only the registry's bookkeeping: a model that expands on its calibration set, or
# a quantizer that crashes on a hostile file, ends the producer, never the controller.


@dataclass(frozen=True)
class VersionInputs:
    """What a producer needs to know about one version (sent to it, so plain data)."""

    ref_path: str
    ref_format: str
    calibration_path: str
    signature: ModelSignature
    order: list[str]
    task: str
    gate: float
    work_dir: str


@dataclass(frozen=True)
class Produced:
    """One variant produced (or an uploaded one checked) and validated by a producer."""

    checked: Validation
    # The produced file in the work folder; "" for an uploaded variant.
    path: str
    per_channel: bool
    prepared: dict[str, object]
    workload: dict[str, Any]
    latency_ms: float
    # The reference's operators, for the reason a conversion that changed nothing is rejected.
    op_types: list[str]
    # Of the produced file's weights (tensors of WEIGHT_MIN_VALUES or more, subgraphs included):
    # the share stored as int8 (None for an fp16 or uploaded variant).
    int8_weight_share: float | None = None


class ProducerDied(OptimizeError):
    """The producer process ended (killed, crashed, out of memory) or timed out."""


class _Refused(Exception):
    """A refusal of the whole version, in words, raised inside the producer."""


class _Production:
    """The producer's side: one version's calibration set, reference and workload, kept
    while its variants are produced one by one."""

    def __init__(self, inputs: VersionInputs, send: Callable[[tuple[str, Any]], None]) -> None:
        self.inputs = inputs
        self.send = send
        self.work_dir = Path(inputs.work_dir)
        try:
            self.calibration = (
                load_calibration(Path(inputs.calibration_path), inputs.signature)
                if inputs.calibration_path
                else None
            )
        except Exception as exc:
            raise _Refused(f"the calibration set cannot be used: {_reason(exc)}") from None
        try:
            self.reference = Runner(Path(inputs.ref_path), inputs.ref_format)
        except Exception as exc:
            raise _Refused(f"the uploaded model does not load here: {_reason(exc)}") from None
        self.workload: Workload | None = None
        self.expected: list[np.ndarray] = []
        # The reference made ready for int8 (True) or fp16 (False): once per version.
        self.preparations: dict[bool, tuple[Path, dict[str, object]]] = {}

    def close(self) -> None:
        for path, _ in self.preparations.values():
            path.unlink(missing_ok=True)

    def latency(self, path: str, fmt: str, zeros: list[np.ndarray]) -> float:
        runner = self.reference if path == self.inputs.ref_path else Runner(Path(path), fmt)
        return runner.latency_ms(self.calibration.sample(0, self.inputs.order) if self.calibration else zeros)

    def expect(self) -> None:
        assert self.calibration is not None
        self.workload = Workload.of(
            self.inputs.signature, self.calibration.samples(self.inputs.order, VALIDATION_SAMPLES)
        )
        try:
            self.expected = self.workload.outputs(self.reference)
        except Exception as exc:
            raise _Refused(
                "the uploaded model fails on the calibration set, so no variant can be validated: "
                + _reason(exc)
            ) from None

    def produce(self, kind: str, uploaded_path: str, uploaded_format: str) -> Produced:
        workload, inputs = self.workload, self.inputs
        assert workload is not None and self.calibration is not None
        if uploaded_path:
            self.send(("progress", 0.5))
            outputs = workload.outputs(Runner(Path(uploaded_path), uploaded_format))
            checked = validate(self.expected, outputs, inputs.task, inputs.gate, inputs.signature.scores())
            self.send(("progress", 0.9))
            latency = Runner(Path(uploaded_path), uploaded_format).latency_ms(workload.samples[0])
            return Produced(checked, "", False, {}, workload.report(), latency, [])
        checked, produced, per_channel, prepared = self._quantize_best(kind)
        try:
            self.send(("progress", 0.9))
            latency = Runner(produced, "onnx").latency_ms(workload.samples[0])
            op_types = sorted({n.op_type for n in onnx.load(inputs.ref_path).graph.node})
            share = int8_weight_share(onnx.load(str(produced))) if kind != FP16 else None
        except BaseException:
            produced.unlink(missing_ok=True)
            raise
        return Produced(
            checked, str(produced), per_channel, prepared, workload.report(), latency, op_types, share
        )

    def _prepared(self, kind: str) -> tuple[Path, dict[str, object]]:
        """The reference prepared for ``kind`` (made on first use for this version)."""
        key = kind != FP16
        if key not in self.preparations:
            path = self.work_dir / f"prepared-{uuid.uuid4().hex}.onnx"
            try:
                done = prepare_for(kind, Path(self.inputs.ref_path), path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self.preparations[key] = (path, done)
        return self.preparations[key]

    def _quantize_best(self, kind: str) -> tuple[Validation, Path, bool, dict[str, object]]:
        """Per-channel weights first; per-tensor too when per-channel misses the gate or fails
        (onnxruntime's per-channel bias adjustment breaks on some fused Gemm biases). Keeps the
        better (validation, file in the work folder, per_channel, what preparing the source did,
        with the per-channel failure if any); the other file is removed."""
        workload, inputs = self.workload, self.inputs
        assert workload is not None and self.calibration is not None
        best: tuple[Validation, Path, bool] | None = None
        prepared: dict[str, object] = {}
        modes = (True, False) if kind != FP16 else (False,)
        for step, per_channel in enumerate(modes):
            self.send(("progress", 0.1 + 0.4 * step))
            target = self.work_dir / f"{kind}-{uuid.uuid4().hex}.onnx"
            try:
                source, done = self._prepared(kind)
                prepared = {**prepared, **done}
                convert(kind, source, target, self.calibration, per_channel)
                outputs = workload.outputs(Runner(target, "onnx"))
                checked = validate(
                    self.expected, outputs, inputs.task, inputs.gate, inputs.signature.scores()
                )
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


def _producer_main(inputs: VersionInputs, memory_limit: int, conn: Connection) -> None:
    """The producer process: commands in, progress and one answer per command out."""
    limit_data_segment(memory_limit)
    production: _Production | None = None
    try:
        try:
            production = _Production(inputs, conn.send)
        except _Refused as exc:
            conn.send(("refused", str(exc)))
            return
        conn.send(("ok", production.calibration is not None))
        while True:
            command, *args = conn.recv()
            if command == "stop":
                return
            try:
                if command == "latency":
                    conn.send(("ok", production.latency(*args)))
                elif command == "expect":
                    production.expect()
                    conn.send(("ok", None))
                elif command == "produce":
                    conn.send(("ok", production.produce(*args)))
                else:
                    raise AssertionError(f"unknown producer command {command!r}")
            except _Refused as exc:
                conn.send(("refused", str(exc)))
            # onnxruntime and LiteRT raise their own types: the text is the operator's reason.
            except Exception as exc:
                text = _reason(exc)
                conn.send(("memory" if any(m in text for m in OUT_OF_MEMORY) else "failed", text))
    except MemoryError:
        conn.send(("memory", "MemoryError"))
    except EOFError:
        return
    finally:
        if production is not None:
            production.close()
        conn.close()


class _Producer:
    """The controller's handle on one producer process."""

    def __init__(self, inputs: VersionInputs, memory_limit: int, timeout_s: float) -> None:
        self.memory_limit = memory_limit
        self.timeout_s = timeout_s
        self._conn, theirs = process_context.Pipe(duplex=True)
        self._proc = process_context.Process(
            target=_producer_main, args=(inputs, memory_limit, theirs), name="variant-producer", daemon=True
        )
        self._proc.start()
        theirs.close()
        try:
            self.has_calibration = bool(self._answer("loading the model", None))
        except BaseException:
            self.close()
            raise

    def ask(self, doing: str, *command: Any, progress: Callable[[float], None] | None = None) -> Any:
        """Send a command; its answer, OptimizeError with the reason, or ProducerDied."""
        try:
            self._conn.send(command)
        except OSError:
            raise self._died(doing) from None
        return self._answer(doing, progress)

    def _answer(self, doing: str, progress: Callable[[float], None] | None) -> Any:
        while True:
            if not self._conn.poll(self.timeout_s):
                self.close()
                raise ProducerDied(f"{doing} took longer than {self.timeout_s:.0f} s")
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                raise self._died(doing) from None
            if kind == "progress":
                if progress is not None:
                    progress(float(value))
                continue
            if kind == "ok":
                return value
            if kind == "refused":
                raise _VersionRefused(str(value))
            if kind == "memory":
                self.close()
                raise ProducerDied(self._memory_reason("ran out of memory", doing))
            raise OptimizeError(str(value))

    def _died(self, doing: str) -> ProducerDied:
        self._proc.join(5)
        code = self._proc.exitcode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        self.close()
        return ProducerDied(self._memory_reason(how, doing))

    def _memory_reason(self, how: str, doing: str) -> str:
        return (
            f"variant production {how} while {doing}: it needs more than the {human(self.memory_limit)} "
            f"it may take in memory ({MEMORY_FACTOR} x max_model_memory_bytes), or the runtime crashed on it"
        )

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop",))
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


class _VersionRefused(OptimizeError):
    """The producer refused the whole version (its calibration set or reference is unusable)."""


# -- the background worker ---------------------------------------------------------


class Optimizer:
    def __init__(
        self,
        registry: Registry,
        work_dir: Path,
        memory_limit: int | None = None,
        timeout_s: float = PRODUCER_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.work_dir = work_dir
        # What one producer process may take: a few models' worth (the reference, the
        # prepared copy, the candidate and its session) beside the workload's outputs.
        self.memory_limit = memory_limit or MEMORY_FACTOR * registry.max_model_memory_bytes
        self.timeout_s = timeout_s
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._sweep()
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
        # Any escape (the registry, the producer's pipe) is this version's reason.
        except Exception as exc:
            self._fail_unfinished(name, version, f"variant production stopped: {_reason(exc)}")
            raise

    def _process(self, found: ModelVersion) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        reference = found.variant(next(v.variant for v in found.variants if v.digest == found.digest))
        assert reference is not None
        inputs = VersionInputs(
            ref_path=str(self.registry.artifacts.path(reference.digest)),
            ref_format=reference.format,
            calibration_path=(
                str(self.registry.calibration_path(found.calibration_digest))
                if found.calibration_digest
                else ""
            ),
            signature=found.signature,
            order=[s.name for s in found.inputs],
            task=found.task,
            gate=found.gate,
            work_dir=str(self.work_dir),
        )
        producer: _Producer | None = None
        try:
            producer = self._start(found, inputs)
            if producer is None:
                return
            for v in found.variants:
                if v.status == "ready" and v.latency_ms is None:
                    producer = producer or self._start(found, inputs)
                    if producer is None:
                        return
                    producer = self._measure(found, v, producer)
            unfinished = [v for v in found.variants if v.status in ("pending", "running")]
            if not inputs.calibration_path or not unfinished:
                return
            for variant in unfinished:
                producer = producer or self._start(found, inputs)
                if producer is None:
                    return
                producer = self._produce_one(found, variant, producer)
        finally:
            if producer is not None:
                producer.close()

    def _start(self, found: ModelVersion, inputs: VersionInputs) -> _Producer | None:
        """A producer holding the version's reference and, with a calibration set, its expected
        outputs; None (every unfinished variant failed with the reason) when that cannot be."""
        producer: _Producer | None = None
        try:
            producer = _Producer(inputs, self.memory_limit, self.timeout_s)
            if producer.has_calibration and any(v.status in ("pending", "running") for v in found.variants):
                producer.ask("running the reference on the calibration set", "expect")
            return producer
        except OptimizeError as exc:
            if producer is not None:
                producer.close()
            self._fail_unfinished(found.name, found.version, str(exc))
            return None

    def _measure(self, found: ModelVersion, variant: Variant, producer: _Producer) -> _Producer | None:
        """The latency of a variant that is ready without one; returns the producer, or None
        when it ended (the next step starts another)."""
        try:
            latency = producer.ask(
                "measuring latency",
                "latency",
                str(self.registry.artifacts.path(variant.digest)),
                variant.format,
                _zeros(variant),
            )
        except OptimizeError as exc:  # a model that loads but cannot run this sample: say so, keep going
            log.warning(
                "latency not measured model=%s version=%s variant=%s reason=%s",
                found.name, found.version, variant.variant, exc,
            )  # fmt: skip
            return None if isinstance(exc, ProducerDied) else producer
        self.registry.set_variant_state(
            found.name, found.version, variant.variant, variant.status, variant.progress, variant.reason,
            latency_ms=latency,
        )  # fmt: skip
        return producer

    def _produce_one(self, found: ModelVersion, variant: Variant, producer: _Producer) -> _Producer | None:
        """Produce (or check) one variant with ``producer``; returns it, or None if it ended."""
        name, version = found.name, found.version
        # Counted before the work: a variant whose production ends the controller is tried
        # MAX_ATTEMPTS times across restarts, not forever.
        attempts = int(variant.report.get("attempts", 0)) + 1
        if attempts > MAX_ATTEMPTS:
            reason = (
                f"variant production was interrupted {MAX_ATTEMPTS} times (the controller stopped "
                "while producing it); not tried again"
            )
            self._failed(name, version, variant.variant, reason)
            return producer
        progress = {**variant.report, "attempts": attempts}
        self.registry.set_variant_state(name, version, variant.variant, "running", 0.05, "", progress)
        variant = replace(variant, report=progress)
        uploaded = variant.source == "uploaded"
        try:
            produced: Produced = producer.ask(
                f"producing {variant.variant}",
                "produce",
                variant.variant,
                str(self.registry.artifacts.path(variant.digest)) if uploaded else "",
                variant.format if uploaded else "",
                progress=lambda p: self.registry.set_variant_state(
                    name, version, variant.variant, "running", p
                ),
            )
            self._record(found, variant, produced)
        except ProducerDied as exc:
            self._failed(name, version, variant.variant, str(exc))
            self._sweep()
            return None
        # The registry and the producer raise their own types: any failure is this variant's reason.
        except Exception as exc:
            self._failed(name, version, variant.variant, _reason(exc))
        return producer

    def _record(self, found: ModelVersion, variant: Variant, produced: Produced) -> None:
        name, version, kind = found.name, found.version, variant.variant
        state = self.registry.set_variant_state
        checked = produced.checked
        if variant.source == "uploaded":
            # What the upload found (quantization parameters, weight storage) stays beside the figures.
            report = {**variant.report, **checked.report, **produced.workload}
        else:
            report = {
                "attempts": variant.report.get("attempts", 1),
                **checked.report,
                **produced.workload,
                **({"per_channel": produced.per_channel} if kind != FP16 else {}),
                **({"preparation": produced.prepared} if produced.prepared else {}),
            }
            try:
                stored = self.registry.attach_artifact(name, version, kind, Path(produced.path))
            finally:
                Path(produced.path).unlink(missing_ok=True)
            if stored.precision != PRODUCED_PRECISION[kind]:
                reason = (
                    f"no operator of this model could be converted to {PRODUCED_PRECISION[kind]} "
                    f"({', '.join(produced.op_types)})"
                )
                if set(produced.op_types) & {"If", "Loop", "Scan"}:
                    reason += (
                        "; the static quantizer leaves the weights inside If/Loop/Scan subgraphs as they are"
                    )
                state(name, version, kind, "rejected", 1.0, reason, report)
                return
            share = produced.int8_weight_share
            if share is not None and share < MIN_INT8_WEIGHT_SHARE:
                # QuantizeLinear/DequantizeLinear around a few activations make a file int8 in name
                # while its weights stay float: larger than its reference, and no faster.
                reason = (
                    f"only {share:.0%} of the weights were quantized to int8 (at least "
                    f"{MIN_INT8_WEIGHT_SHARE:.0%} needed); the rest stay float"
                )
                if kind == STATIC_INT8 and set(produced.op_types) & {"If", "Loop", "Scan"}:
                    reason += " inside If/Loop/Scan subgraphs, where the static quantizer does not go"
                state(name, version, kind, "rejected", 1.0, reason, {**report, "int8_weight_share": share})
                return
        status = "ready" if checked.passed else "rejected"
        state(name, version, kind, status, 1.0, checked.reason, report, produced.latency_ms)
        log.info(
            "variant %s model=%s version=%s variant=%s latency_ms=%.3f report=%s reason=%s",
            status, name, version, kind, produced.latency_ms, report, checked.reason or "-",
        )  # fmt: skip

    def _sweep(self) -> None:
        """Remove what a producer that died (or a controller that was killed) left in the work
        folder; only while no producer runs (there is one at a time, on the worker thread)."""
        for path in self.work_dir.glob("*.onnx"):
            path.unlink(missing_ok=True)

    def _failed(self, name: str, version: str, variant: str, reason: str) -> None:
        self.registry.set_variant_state(name, version, variant, "failed", 1.0, reason)
        log.error("variant failed model=%s version=%s variant=%s reason=%s", name, version, variant, reason)

    def _fail_unfinished(self, name: str, version: str, reason: str) -> None:
        found = self.registry.find(name, version)
        for v in found.variants if found is not None else []:
            if v.status in ("pending", "running"):
                self._failed(name, version, v.variant, reason)


def int8_weight_share(model: onnx.ModelProto) -> float | None:
    """The share of a model's weight values stored as int8 or uint8: initializers and Constant
    tensors of WEIGHT_MIN_VALUES or more, in every graph (If/Loop/Scan bodies too); None when it
    has no such tensor (a toy model's weights are all small)."""
    quantized = total = 0
    for tensor in _weights(model.graph):
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if count < WEIGHT_MIN_VALUES or tensor.data_type not in _WEIGHT_TYPES:
            continue
        total += count
        if tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            quantized += count
    return quantized / total if total else None


def _weights(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from _weights(body)


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
