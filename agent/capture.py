"""Data capture: which inputs a tenant keeps for retraining, and how they travel.

Pure code (numpy, no I/O): :func:`capture_reason` is the policy decision for
one sample, :class:`Capturer` applies it with the policy's bounds (samples per
hour, samples and bytes per upload) and packs a full buffer into an ``.npz``
data set, and :func:`chunk_upload` cuts that into ``CaptureChunk`` messages
for the ``capture`` topic (the controller reassembles them, checks the sha256
and stores the data set; see docs/closed-loop.md).

The agent holds one :class:`Captures` (a :class:`Capturer` per tenant, made
from the desired state's capture policies) and wires it in :mod:`agent.observe`::

    captures.set_policies(desired.capture_policies, desired.drift_specs)
    # per inference, after the model answered
    captures.offer(tenant, model_name, model_version, inputs_batch, probabilities_batch)
    # from the agent's loop: full buffers, and those waiting longer than max_age_s
    for chunks in captures.uploads():
        for chunk in chunks:
            outbox.append("capture", encode(chunk), now_ms)

``inputs_row`` is one sample's input tensor (any shape, numeric), and
``probabilities_row`` its output probabilities (1-D) or None.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from edgefleet_proto import fleet_pb2

DEFAULT_CHUNK_SIZE = 64 * 1024
REASON_CODES = {"random": 0, "low_confidence": 1, "drifted": 2}
HOUR_S = 3600.0


@dataclass(frozen=True)
class Bounds:
    """Each feature's [first edge, last edge] from the drift spec: the baseline's body."""

    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]

    @classmethod
    def from_spec(cls, spec: fleet_pb2.DriftSpec | None) -> Bounds | None:
        if spec is None:
            return None
        edges = {h.name: (h.edges[0], h.edges[-1]) for h in spec.features if h.edges}
        names = sorted((n for n in edges if n.startswith("f") and n[1:].isdigit()), key=lambda n: int(n[1:]))
        if not names or [int(n[1:]) for n in names] != list(range(len(names))):
            return None  # only tabular features f0..fN-1 are checked per sample
        return cls(
            np.array([edges[n][0] for n in names], dtype=np.float64),
            np.array([edges[n][1] for n in names], dtype=np.float64),
        )

    def outside_share(self, features: npt.NDArray[np.float64]) -> float:
        shares = self.outside_shares(features.reshape(1, -1))
        return 0.0 if shares is None else float(shares[0])

    def outside_shares(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
        """Each row's share of features outside the body; None for rows of another width."""
        if features.shape[1] != self.low.size:
            return None
        shares: npt.NDArray[np.float64] = ((features < self.low) | (features > self.high)).mean(axis=1)
        return shares


def capture_reason(
    policy: fleet_pb2.CapturePolicy,
    inputs: npt.ArrayLike,
    probabilities: npt.ArrayLike | None,
    bounds: Bounds | None,
    draw: float,
) -> str | None:
    """Why this sample should be kept, or None. ``draw`` is uniform in [0, 1).

    A drifted input says most about what the model has not seen, a
    low-confidence one about where it hesitates; the random sample keeps the
    captured data representative.
    """
    probs = None if probabilities is None else np.asarray(probabilities).reshape(1, -1)
    return capture_reasons(policy, np.asarray(inputs).reshape(1, -1), probs, bounds, np.array([draw]))[0]


def capture_reasons(
    policy: fleet_pb2.CapturePolicy,
    inputs: npt.NDArray[np.generic],
    probabilities: npt.NDArray[np.generic] | None,
    bounds: Bounds | None,
    draws: npt.NDArray[np.float64],
    weight: int = 1,
) -> list[str | None]:
    """:func:`capture_reason` of each sample of a batch (samples along the first axis) at once.

    Each sample stands for ``weight`` inferences (the closed loop samples one in ``weight`` when
    the rate is high): its random draw is taken against ``weight`` times the policy's fraction,
    so random captures keep the policy's share of every inference (up to one per sample).
    Drifted and low-confidence inputs are found among the samples only.
    """
    n = len(inputs)
    reasons: list[str | None] = [None] * n
    random_kept = draws < policy.random_fraction * weight
    drifted = low = np.zeros(n, dtype=bool)
    if policy.drifted_feature_share > 0 and bounds is not None:
        shares = bounds.outside_shares(np.asarray(inputs, dtype=np.float64).reshape(n, -1))
        if shares is not None:
            drifted = shares > policy.drifted_feature_share
    if policy.low_confidence_below > 0 and probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64).reshape(n, -1)
        if probs.shape[1]:
            low = probs.max(axis=1) < policy.low_confidence_below
    for i in np.flatnonzero(drifted | low | random_kept):
        reasons[i] = "drifted" if drifted[i] else "low_confidence" if low[i] else "random"
    return reasons


def chunk_upload(
    data: bytes,
    policy: fleet_pb2.CapturePolicy,
    model_version: str,
    start_ms: int,
    end_ms: int,
    samples: int,
    reasons: dict[str, int],
    upload_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[fleet_pb2.CaptureChunk]:
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    return [
        fleet_pb2.CaptureChunk(
            upload_id=upload_id,
            tenant=policy.tenant,
            model_name=policy.model_name,
            model_version=model_version,
            policy_id=policy.policy_id,
            index=i,
            count=len(parts),
            data=part,
            sha256=digest,
            size=len(data),
            start_ms=start_ms,
            end_ms=end_ms,
            samples=samples,
            reasons=reasons,
        )
        for i, part in enumerate(parts)
    ]


@dataclass
class _Buffer:
    inputs: list[npt.NDArray[np.float32]] = field(default_factory=list)
    probabilities: list[npt.NDArray[np.float32]] = field(default_factory=list)
    at_ms: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    nbytes: int = 0


class Capturer:
    """One tenant's capture: the policy's decision, its bounds, and the upload buffer."""

    def __init__(
        self,
        policy: fleet_pb2.CapturePolicy,
        model_version: str,
        spec: fleet_pb2.DriftSpec | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.policy = policy
        self.model_version = model_version
        self.bounds = Bounds.from_spec(spec)
        self.rng = rng or random.Random()
        self.clock = clock
        self.chunk_size = chunk_size
        self._recent: deque[float] = deque()
        self._buffer = _Buffer()

    def _under_hourly_bound(self, now: float) -> bool:
        while self._recent and now - self._recent[0] >= HOUR_S:
            self._recent.popleft()
        limit = self.policy.max_samples_per_hour
        return limit == 0 or len(self._recent) < limit

    def pending_since(self) -> float | None:
        """When the oldest sample in the buffer was kept (clock seconds), None when empty."""
        return self._buffer.at_ms[0] / 1000.0 if self._buffer.at_ms else None

    def ready(self) -> bool:
        """The buffer is full: upload it (take_upload) before more is captured."""
        p, b = self.policy, self._buffer
        full_count = p.max_samples_per_upload > 0 and len(b.inputs) >= p.max_samples_per_upload
        return bool(b.inputs) and (
            full_count or (p.max_bytes_per_upload > 0 and b.nbytes >= p.max_bytes_per_upload)
        )

    def offer(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None = None) -> str | None:
        """Keep the sample if the policy wants it and the bounds allow; returns the reason kept."""
        now = self.clock()
        if self.ready() or not self._under_hourly_bound(now):
            return None
        reason = capture_reason(self.policy, inputs, probabilities, self.bounds, self.rng.random())
        if reason is None:
            return None
        return self._keep(inputs, probabilities, reason, now)

    def keep(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None, reason: str) -> str | None:
        """Keep a sample the policy already chose (for ``reason``) if the bounds allow."""
        now = self.clock()
        if self.ready() or not self._under_hourly_bound(now):
            return None
        return self._keep(inputs, probabilities, reason, now)

    def _keep(
        self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None, reason: str, now: float
    ) -> str | None:
        row = np.asarray(inputs, dtype=np.float32)
        probs = None if probabilities is None else np.asarray(probabilities, dtype=np.float32).ravel()
        size = row.nbytes + (probs.nbytes if probs is not None else 0)
        b = self._buffer
        if (
            self.policy.max_bytes_per_upload
            and b.nbytes + size > self.policy.max_bytes_per_upload
            and b.inputs
        ):
            return None
        if b.inputs and (row.shape != b.inputs[0].shape or (probs is None) != (not b.probabilities)):
            return None  # one data set holds one input shape; a model change starts a new one
        b.inputs.append(row)
        if probs is not None:
            b.probabilities.append(probs)
        b.at_ms.append(int(now * 1000))
        b.reasons.append(reason)
        b.nbytes += size
        self._recent.append(now)
        return reason

    def take_upload(self, upload_id: str | None = None) -> list[fleet_pb2.CaptureChunk]:
        """The buffer as an .npz data set in chunks; the buffer starts empty again."""
        b, self._buffer = self._buffer, _Buffer()
        if not b.inputs:
            return []
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "inputs": np.stack(b.inputs),
            "at_ms": np.asarray(b.at_ms, dtype=np.int64),
            "reason_codes": np.asarray([REASON_CODES[r] for r in b.reasons], dtype=np.uint8),
        }
        if b.probabilities and len(b.probabilities) == len(b.inputs):
            arrays["probabilities"] = np.stack(b.probabilities)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return chunk_upload(
            buf.getvalue(),
            self.policy,
            self.model_version,
            start_ms=b.at_ms[0],
            end_ms=b.at_ms[-1],
            samples=len(b.inputs),
            reasons=dict(Counter(b.reasons)),
            upload_id=upload_id or uuid.uuid4().hex,
            chunk_size=self.chunk_size,
        )


class Captures:
    """Every tenant's capture on one device, kept in step with the desired state. Thread-safe.

    A tenant has a policy for one model; its capturer follows the version the
    tenant serves: when the version changes, what was captured under the old one
    is uploaded as its own data set (a data set names one model version).
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        max_age_s: float = 60.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.rng = rng or random.Random()
        self.clock = clock
        self.max_age_s = max_age_s
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._policies: dict[str, fleet_pb2.CapturePolicy] = {}
        self._specs: dict[tuple[str, str, str], fleet_pb2.DriftSpec] = {}
        self._capturers: dict[str, Capturer] = {}
        # The drift spec each tenant's capturer took its bounds from.
        self._made_with: dict[str, fleet_pb2.DriftSpec | None] = {}
        self._done: list[list[fleet_pb2.CaptureChunk]] = []

    def set_policies(
        self, policies: Iterable[fleet_pb2.CapturePolicy], specs: Iterable[fleet_pb2.DriftSpec] = ()
    ) -> None:
        by_tenant = {p.tenant: p for p in policies}
        by_key = {(s.tenant, s.model_name, s.model_version): s for s in specs}
        with self._lock:
            self._policies, self._specs = by_tenant, by_key
            for tenant, capturer in list(self._capturers.items()):
                policy = by_tenant.get(tenant)
                spec = by_key.get((tenant, capturer.policy.model_name, capturer.model_version))
                if policy == capturer.policy and spec == self._made_with.get(tenant):
                    continue
                # The policy or the bounds changed: what was kept under the old ones is uploaded.
                self._retire(tenant)

    def wants(self, tenant: str, model_name: str) -> bool:
        """Whether the tenant captures for that model (a cheap check before any work per inference)."""
        policy = self._policies.get(tenant)
        return policy is not None and policy.model_name == model_name

    def offer(
        self,
        tenant: str,
        model_name: str,
        model_version: str,
        inputs: npt.NDArray[np.generic],
        probabilities: npt.NDArray[np.generic] | None,
        weight: int = 1,
    ) -> int:
        """Offer a batch (samples along the first axis), each sample standing for ``weight``
        inferences (:func:`capture_reasons`); returns how many samples were kept. The policy
        judges the whole batch at once; only the samples it chose go through the bounds."""
        with self._lock:
            policy = self._policies.get(tenant)
            if policy is None or policy.model_name != model_name:
                return 0
            capturer = self._capturers.get(tenant)
            if capturer is not None and capturer.model_version != model_version:
                self._retire(tenant)
                capturer = None
            if capturer is None:
                spec = self._specs.get((tenant, model_name, model_version))
                self._made_with[tenant] = spec
                capturer = self._capturers[tenant] = Capturer(
                    policy, model_version, spec, self.rng, self.clock, self.chunk_size
                )
            draws = np.array([capturer.rng.random() for _ in range(len(inputs))])
            reasons = capture_reasons(policy, inputs, probabilities, capturer.bounds, draws, weight)
            kept = 0
            for i, reason in enumerate(reasons):
                if reason is None:
                    continue
                if capturer.ready():
                    self._done.append(capturer.take_upload())
                row_probs = None if probabilities is None else probabilities[i]
                kept += capturer.keep(inputs[i], row_probs, reason) is not None
            if capturer.ready():
                self._done.append(capturer.take_upload())
            return kept

    def uploads(self) -> list[list[fleet_pb2.CaptureChunk]]:
        """Finished uploads, oldest first: full buffers and buffers older than ``max_age_s``."""
        now = self.clock()
        with self._lock:
            for tenant, capturer in list(self._capturers.items()):
                since = capturer.pending_since()
                if since is not None and now - since >= self.max_age_s:
                    self._done.append(capturer.take_upload())
                if tenant not in self._policies:
                    self._retire(tenant)
            done, self._done = self._done, []
        return [chunks for chunks in done if chunks]

    def flush(self) -> list[list[fleet_pb2.CaptureChunk]]:
        """Everything captured so far, as uploads (the agent is stopping: the outbox keeps them)."""
        with self._lock:
            for tenant in list(self._capturers):
                self._retire(tenant)
            done, self._done = self._done, []
        return [chunks for chunks in done if chunks]

    def _retire(self, tenant: str) -> None:
        capturer = self._capturers.pop(tenant)
        self._made_with.pop(tenant, None)
        self._done.append(capturer.take_upload())
