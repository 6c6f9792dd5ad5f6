"""What the closed loop sees of each inference: drift sketches and captured samples.

One :class:`Observer` per agent. The service gives it each accepted desired
state (:meth:`Observer.configure`: drift specs and capture policies); the tenant
pipelines and gRPC Infer call :meth:`Observer.observe` after every inference of
a served (never a shadow) model; the service's loop drains the sketches into
each telemetry window and sends finished capture uploads through the outbox.

The per-inference path returns at once for a model version with neither a spec
nor a capture policy, and a bad batch only costs that batch: the error is
logged (rate-limited) and counted, never raised into the inference.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import numpy as np
from edgefleet_proto import fleet_pb2

from agent.capture import Captures
from agent.drift_sketch import Sketcher, probabilities_of
from agent.postprocess import Outcome

log = logging.getLogger(__name__)

WARN_EVERY_S = 30.0


class Observer:
    def __init__(
        self, device_id: str, sketcher: Sketcher | None = None, captures: Captures | None = None
    ) -> None:
        self.device_id = device_id
        self.sketcher = sketcher or Sketcher()
        self.captures = captures or Captures()
        self._lock = threading.Lock()
        self._warned_at: dict[tuple[str, str], float] = {}
        self.failures = 0

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
    ) -> None:
        """``layout`` (``nchw``/``nhwc``) is where an image's channels are, when the caller
        knows (a pipeline's preprocessing made it); else the drift spec tells. ``outcome`` is
        the tenant's post-processed result: its scores, not the raw outputs, are then the
        predicted class and confidence that the sketch (and the confidence gate) read; a
        captured sample keeps the model's own outputs."""
        sketch = self.sketcher.wants(tenant, model_name, model_version)
        capture = self.captures.wants(tenant, model_name)
        if not (sketch or capture):
            return
        try:
            probs = probabilities_of(outputs)
            if sketch:
                scores = probs if outcome is None else scores_of(outcome)
                self.sketcher.observe(tenant, model_name, model_version, inputs, scores, layout)
            if capture:
                batch = inputs if inputs.ndim > 1 else inputs[None, ...]
                if probs is not None and len(probs) != len(batch):
                    probs = None
                self.captures.offer(tenant, model_name, model_version, batch, probs)
        except (ValueError, TypeError) as exc:
            self._failed(tenant, model_name, model_version, exc)

    def _failed(self, tenant: str, model_name: str, model_version: str, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
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
        return self.sketcher.drain()

    def uploads(self, final: bool = False) -> list[list[fleet_pb2.CaptureChunk]]:
        """Finished capture uploads; with ``final``, partly filled buffers too (shutdown)."""
        return self.captures.flush() if final else self.captures.uploads()


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
