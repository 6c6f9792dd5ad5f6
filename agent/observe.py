"""What the closed loop sees of each inference: drift sketches and captured samples.

One :class:`Observer` per agent. The service gives it each accepted desired
state (:meth:`Observer.configure`: drift specs and capture policies); the tenant
pipelines and gRPC Infer call :meth:`Observer.observe` after every inference of
a served (never a shadow) model; the service's loop drains the sketches into
each telemetry window and sends finished capture uploads through the outbox.

The inference thread only decides whether the inference is observed and queues
references to its arrays (the callers never change them afterwards); a thread of
the observer's own sketches and captures what waits in batches, one numpy pass
per model version and input shape instead of one per inference. Draining the
sketches or the uploads first takes in whatever still waits, so a window holds
every inference observed before it closed.

Above ``SAMPLE_ABOVE_HZ`` inferences a second for one model version, only one in
``stride`` is observed, drawn at random in each block of ``stride`` consecutive
inferences, and it counts ``stride`` times in the
sketch (bins and samples) and in capture's random draw. A random draw that does
not look at the values keeps each bin's expected count equal to the count of
every inference, so the window's histograms stay unbiased and a busy device still
weighs its true share in the fleet's merged window; drifted and low-confidence
captures are found among the drawn inferences (at that rate the policy's hourly
bound caps them long before). The rate is measured over a period that ends after
``RATE_PERIOD_S`` or after as many inferences as the limit allows in one, so a
burst is sampled within milliseconds.

A model version with neither a spec nor a capture policy costs two dict lookups,
and a bad batch only costs that batch: the error is logged (rate-limited) and
counted, never raised into the inference.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from edgefleet_proto import fleet_pb2

from agent.capture import Captures
from agent.drift_sketch import Sketcher, probabilities_of
from agent.postprocess import Outcome

log = logging.getLogger(__name__)

WARN_EVERY_S = 30.0
# Past this many inferences a second of one model version, the closed loop samples them.
# High enough that a window holds hundreds of drawn inferences (each costs the sketching
# thread 3-9 us, so 2,000 a second is about 1 % of a core): a few heavily weighted draws are
# unbiased but noisy, and at 250 a second a replayed file's 187 audio frames were sketched
# as 68 draws weighing up to 42 each, which read as drift (PSI 0.98) on unchanged audio.
SAMPLE_ABOVE_HZ = 2000.0
RATE_PERIOD_S = 0.25
# The sketching thread wakes when this many inferences wait, or this long after the first.
BATCH = 64
GATHER_S = 0.1
# Inferences that may wait for the sketching thread; past it (a thread starved of CPU) an
# inference is turned away and its weight carried by the next one of its model version.
MAX_PENDING = 4096
# A thread with nothing to do for this long ends; the next inference starts another.
IDLE_EXIT_S = 10.0

Key = tuple[str, str, str]


class _Seen(NamedTuple):
    """One observed inference, as the inference thread hands it over (references, no copies)."""

    tenant: str
    model_name: str
    model_version: str
    inputs: np.ndarray
    outputs: Mapping[str, np.ndarray]
    layout: str
    outcome: Outcome | None
    weight: int
    # The output the version's signature calls its class scores ("" when none does).
    scores: str = ""


@dataclass
class _Rate:
    """One model version's inference rate over the current period, the stride it set, and where
    the current block of ``stride`` inferences is. Updated without a lock by every worker: a
    lost count only nudges the rate estimate or a block's length, and the weight an inference
    is queued with is the stride it was drawn with."""

    since: float
    stride: int = 1
    seen: int = 0
    # The current block: its length (the stride when it began), the position in it, and the
    # position drawn in it.
    block: int = 1
    position: int = 0
    pick: int = 0


class Observer:
    def __init__(
        self,
        device_id: str,
        sketcher: Sketcher | None = None,
        captures: Captures | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_above_hz: float = SAMPLE_ABOVE_HZ,
    ) -> None:
        self.device_id = device_id
        self.sketcher = sketcher or Sketcher()
        self.captures = captures or Captures()
        self._rng = rng or random.Random()
        self._clock = clock
        self._sample_above_hz = sample_above_hz
        # A period ends early once it saw as many inferences as the limit allows in one.
        self._period_limit = max(1, int(sample_above_hz * RATE_PERIOD_S))
        self._lock = threading.Lock()
        self._warned_at: dict[tuple[str, str], float] = {}
        self._failures = 0
        self._rates: dict[Key, _Rate] = {}
        self._pending: deque[_Seen] = deque()
        # Weight of admitted inferences the full queue turned away, per model version.
        self._carried: dict[Key, int] = {}
        self._ready = threading.Event()
        # Guards starting and ending the sketching thread; _processing keeps one batch at a
        # time (the thread or a drain), so each model version's inferences go in order.
        self._life = threading.Lock()
        self._thread: threading.Thread | None = None
        self._processing = threading.Lock()

    def configure(self, desired: fleet_pb2.DesiredState) -> None:
        self.sketcher.set_specs(desired.drift_specs)
        self.captures.set_policies(desired.capture_policies, desired.drift_specs)

    def observe(
        self,
        tenant: str,
        model_name: str,
        model_version: str,
        inputs: np.ndarray,
        outputs: Mapping[str, np.ndarray],
        layout: str = "",
        outcome: Outcome | None = None,
        scores: str = "",
    ) -> None:
        """``layout`` (``nchw``/``nhwc``) is where an image's channels are, when the caller
        knows (a pipeline's preprocessing made it); else the drift spec tells. ``scores`` names
        the output the version's signature calls its class scores ("" when none does: no class
        or confidence is sketched, no probabilities captured). ``outcome`` is
        the tenant's post-processed result: its scores, not the raw outputs, are then the
        predicted class and confidence that the sketch (and the confidence gate) read; a
        captured sample keeps the model's own outputs. The arrays are kept, not copied, until
        the sketching thread took them in: the caller must not change them afterwards."""
        weight = self.admit(tenant, model_name, model_version)
        if weight:
            self.offer(tenant, model_name, model_version, inputs, outputs, layout, outcome, weight, scores)

    def admit(self, tenant: str, model_name: str, model_version: str) -> int:
        """How many inferences this one stands for in the closed loop: 0 when it is not observed
        (no spec and no capture policy, or not drawn while the rate is high), else the stride
        it was drawn with. A caller that admits hands the inference to :meth:`offer`."""
        if not (
            self.sketcher.wants(tenant, model_name, model_version) or self.captures.wants(tenant, model_name)
        ):
            return 0
        key = (tenant, model_name, model_version)
        now = self._clock()
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = _Rate(now)
        rate.seen += 1
        if rate.seen >= self._period_limit or now - rate.since >= RATE_PERIOD_S:
            hz = rate.seen / max(now - rate.since, 1e-6)
            rate.stride = max(1, math.ceil(hz / self._sample_above_hz))
            rate.since, rate.seen = now, 0
        # One inference drawn at random in each block of ``stride`` consecutive ones: each has
        # the chance 1/stride whatever its place (no aliasing with a periodic input), and the
        # drawn ones' weights add up to the count of inferences within one block. A new stride
        # takes effect when the current block ends.
        position = rate.position
        if position == 0:
            rate.block = block = rate.stride
            if block == 1:
                return 1
            rate.pick = self._rng.randrange(block)
        else:
            block = rate.block
        rate.position = position + 1 if position + 1 < block else 0
        return block if position == rate.pick else 0

    def offer(
        self,
        tenant: str,
        model_name: str,
        model_version: str,
        inputs: np.ndarray,
        outputs: Mapping[str, np.ndarray],
        layout: str,
        outcome: Outcome | None,
        weight: int,
        scores: str = "",
    ) -> None:
        """Queue an admitted inference for the sketching thread; returns at once."""
        pending = self._pending
        if self._carried:
            weight += self._carried.pop((tenant, model_name, model_version), 0)
        if len(pending) >= MAX_PENDING:
            key = (tenant, model_name, model_version)
            self._carried[key] = self._carried.get(key, 0) + weight
            return
        pending.append(
            _Seen(tenant, model_name, model_version, inputs, outputs, layout, outcome, weight, scores)
        )
        n = len(pending)
        if n == 1 or n == BATCH or self._thread is None:
            self._wake()

    def _wake(self) -> None:
        with self._life:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="closed-loop", daemon=True)
                self._thread.start()
        self._ready.set()

    def _run(self) -> None:
        while True:
            if not self._ready.wait(IDLE_EXIT_S):
                with self._life:
                    if not self._pending:
                        self._thread = None
                        return
            self._ready.clear()
            if len(self._pending) < BATCH:
                # Gather a batch: one numpy pass for many inferences.
                self._ready.wait(GATHER_S)
                self._ready.clear()
            try:
                self.process()
            except Exception:
                # A bug in sketching must not end the closed loop: logged, the next batch goes on.
                log.exception("closed loop batch failed device=%s", self.device_id)

    def process(self) -> None:
        """Sketch and capture every inference waiting (the thread does it in the background;
        a drain first, so that nothing observed before it is left out)."""
        with self._processing:
            pending, seen = self._pending, []
            while pending:
                seen.append(pending.popleft())
            groups: dict[tuple[object, ...], list[_Seen]] = {}
            for s in seen:
                key = (s.tenant, s.model_name, s.model_version, s.layout, s.weight, s.scores, s.inputs.shape)
                groups.setdefault(key, []).append(s)
            for members in groups.values():
                self._observe_group(members)

    def _observe_group(self, members: list[_Seen]) -> None:
        """Inferences of one model version, layout, weight, scores output and input shape:
        sketched and offered to capture together, in runs whose scores have one shape."""
        first = members[0]
        tenant, model_name, model_version = first.tenant, first.model_name, first.model_version
        sketch = self.sketcher.wants(tenant, model_name, model_version)
        capture = self.captures.wants(tenant, model_name)
        if not (sketch or capture):
            return
        runs: list[tuple[object, list[_Prepared]]] = []
        for s in members:
            try:
                post = None if s.outcome is None else scores_of(s.outcome)
            except (ValueError, TypeError) as exc:
                self._failed(tenant, model_name, model_version, exc)
                continue
            rows = len(s.inputs) if s.inputs.ndim > 1 else 1
            chosen = s.outputs.get(s.scores) if s.scores else None
            raw = None if chosen is None else (chosen.shape[1:], chosen.dtype, len(chosen) == rows)
            key: object = (raw, s.outcome is None, _width(post))
            if (chosen is not None and len(chosen) != rows) or (post is not None and len(post) != rows):
                key = id(s)  # scores that do not match the inputs' rows: alone (the sketch says why)
            if runs and runs[-1][0] == key:
                runs[-1][1].append(_Prepared(s, post))
            else:
                runs.append((key, [_Prepared(s, post)]))
        for _, run in runs:
            self._observe_run(run, sketch, capture)

    def _observe_run(self, run: list[_Prepared], sketch: bool, capture: bool) -> None:
        first = run[0].seen
        tenant, model_name, model_version = first.tenant, first.model_name, first.model_version
        outputs: Mapping[str, np.ndarray] = first.outputs
        if len(run) == 1:
            inputs = first.inputs
        elif first.scores not in first.outputs:
            inputs, outputs = np.concatenate([_batch(item.seen.inputs) for item in run]), {}
        else:
            inputs = np.concatenate([_batch(item.seen.inputs) for item in run])
            # One distribution for the run: a row of logits is softmaxed whatever run it is in, but
            # rows that already sum to one are kept as they are only when all of the run's do (as
            # all of one inference's had to); a model gives one or the other, never a mix.
            outputs = {first.scores: np.concatenate([item.seen.outputs[first.scores] for item in run])}
        try:
            probs = probabilities_of(outputs, first.scores)
        except (ValueError, TypeError) as exc:
            self._failed_each(run, exc)
            return
        if first.outcome is None:
            scores = probs
        else:
            posts = [item.post for item in run if item.post is not None]
            scores = np.concatenate(posts) if len(posts) == len(run) else None
        if sketch:
            try:
                self.sketcher.observe(
                    tenant, model_name, model_version, inputs, scores, first.layout, first.weight
                )
            except (ValueError, TypeError) as exc:
                if len(run) == 1:
                    self._failed(tenant, model_name, model_version, exc)
                    return
                # Binning commits nothing before it succeeds: each one again, alone, finds which
                # failed; those are not captured either.
                for item in run:
                    self._observe_run([item], sketch, capture)
                return
        if capture:
            batch = _batch(inputs)
            if probs is not None and len(probs) != len(batch):
                probs = None
            try:
                self.captures.offer(tenant, model_name, model_version, batch, probs, first.weight)
            except (ValueError, TypeError) as exc:
                self._failed(tenant, model_name, model_version, exc)

    def _failed_each(self, run: list[_Prepared], exc: Exception) -> None:
        for item in run:
            self._failed(item.seen.tenant, item.seen.model_name, item.seen.model_version, exc)

    @property
    def failures(self) -> int:
        """Inferences that could not be sketched or captured, those still waiting judged first."""
        self.process()
        return self._failures

    def _failed(self, tenant: str, model_name: str, model_version: str, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            last = self._warned_at.get((tenant, model_name), -WARN_EVERY_S)
            if now - last < WARN_EVERY_S:
                return
            self._warned_at[(tenant, model_name)] = now
        log.warning(
            "not sketched or captured device=%s tenant=%s model=%s version=%s error=%s",
            self.device_id,
            tenant,
            model_name,
            model_version,
            exc,
        )

    def drain_sketches(self) -> list[fleet_pb2.DriftSketch]:
        self.process()
        return self.sketcher.drain()

    def uploads(self, final: bool = False) -> list[list[fleet_pb2.CaptureChunk]]:
        """Finished capture uploads; with ``final``, partly filled buffers too (shutdown)."""
        self.process()
        return self.captures.flush() if final else self.captures.uploads()


class _Prepared(NamedTuple):
    seen: _Seen
    # A post-processed result's scores (one row), None without an outcome or when it found nothing.
    post: np.ndarray | None


def _batch(inputs: np.ndarray) -> np.ndarray:
    """An input as a batch: a 1-D input is one sample."""
    return inputs if inputs.ndim > 1 else inputs[None, ...]


def _width(scores: np.ndarray | None) -> int | None:
    return None if scores is None else (scores.shape[1] if scores.ndim == 2 else -1)


def scores_of(outcome: Outcome) -> np.ndarray | None:
    """A post-processed result as one row of class scores: each class or detection's score at
    its class index (a detector's best per class), so the row's argmax is the top class and its
    maximum the top score; None when nothing was found (no class, no confidence to sketch)."""
    found = [(c.index, c.score) for c in outcome.classes] + [(d.index, d.score) for d in outcome.detections]
    if not found:
        return None
    row = np.full((1, max(i for i, _ in found) + 1), -np.inf)
    for index, score in found:
        row[0, index] = max(row[0, index], score)
    return row
