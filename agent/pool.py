"""The models each tenant is serving, one loaded copy per artifact, within a memory budget.

Tenants are mapped to :class:`ServingModel` records (swapped atomically); the
loaded sessions live in :class:`PooledModel` objects keyed by artifact digest, so
tenants that use the same artifact share one copy. The pool accounts each loaded
model at its file size (onnxruntime and LiteRT keep the weights once), refuses a
load that would exceed the budget with a reason an operator can act on, and
unloads models idle for ``idle_unload_s``; a request for an unloaded model
reloads it on demand.

During an update the tenant's previous model is *held* (:meth:`ModelPool.hold`)
from staging until the update commits or rolls back, so a rollback serves it at
once. A held model counts against the budget like a serving one and is never
unloaded, neither when idle (it is idle by design) nor to make room: the budget
must fit the new model *and* the held one. Idle models of other tenants are
unloaded first, as for any load (they reload on demand when there is room); if
the two still do not fit, the new model's load is refused with the figures and
the update fails with the tenant still on its current model. A device whose
budget cannot hold two versions of a model at once cannot update it safely, and
we would rather say so than lose the rollback copy or go over the budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from agent.accelerators import Accelerator
from agent.errors import MemoryBudgetExceeded
from agent.runtime import LoadedModel, TensorSpec, backend_for
from agent.signature import ModelSignature

log = logging.getLogger(__name__)
MB = 1024 * 1024


@dataclass(frozen=True)
class ServingModel:
    tenant: str
    model_name: str
    model_version: str
    digest: str
    runtime: str
    path: Path
    model: LoadedModel
    # How each input is fed and what each output means, as the controller sent it (if it did).
    signature: ModelSignature | None = None

    @cached_property
    def fills_inputs(self) -> bool:
        """Whether the signature has constants or states a call may leave out; without any, a
        call's inputs reach the model as sent (worked out once, not per call)."""
        return self.signature is not None and bool(self.signature.feeds())


class PooledModel:
    """A LoadedModel that the pool may unload while idle and reload on the next run."""

    def __init__(self, pool: ModelPool, digest: str, size: int, load: Callable[[], LoadedModel]) -> None:
        self._pool = pool
        self.digest = digest
        self.size = size
        self._load = load
        self._lock = threading.Lock()
        self._model: LoadedModel | None = load()
        self._inputs = self._model.inputs
        self._outputs = self._model.outputs
        self.in_use = 0
        self.last_used = pool.clock()
        self.loads = 1

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        with self._lock:
            model = self._model
            if model is None:
                model = self._reload_if_unloaded()
            # Counted as in use until it ends (never unloaded meanwhile); it counts as used
            # when it ends, which is all the idle and make-room choices read.
            self.in_use += 1
        try:
            return model.run(inputs, output_names)
        finally:
            with self._lock:
                self.in_use -= 1
                self.last_used = self._pool.clock()

    def ensure_loaded(self) -> None:
        """Load the model again if it was unloaded (within the budget)."""
        with self._lock:
            self._reload_if_unloaded()

    def _reload_if_unloaded(self) -> LoadedModel:
        # Caller holds self._lock; the lock order is always model, then pool.
        model = self._model
        if model is None:
            self._pool.reserve(self)
            model = self._model = self._load()
            self.loads += 1
            log.info("model reloaded digest=%s size=%d", self.digest[:12], self.size)
        return model

    def unload_if_idle(self, idle_s: float, now: float) -> bool:
        # Never wait for the lock: its holder is loading or starting a run (busy), and
        # waiting here, under the pool's lock, could deadlock with a concurrent reload.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._model is None or self.in_use or now - self.last_used < idle_s:
                return False
            self._model = None
            return True
        finally:
            self._lock.release()


class ModelPool:
    def __init__(
        self,
        budget_bytes: int = 0,
        idle_unload_s: float = 0.0,
        threads: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.idle_unload_s = idle_unload_s
        self.threads = threads
        # The profile's accelerator: each load asks its runtime for it (agent/accelerators.py).
        self.accelerator = accelerator
        self.clock = clock
        self._lock = threading.RLock()
        self._models: dict[str, ServingModel] = {}
        self._expected: frozenset[str] = frozenset()
        self._loaded: dict[str, PooledModel] = {}
        # Per tenant, the model it served before the update in progress (kept for rollback).
        self._held: dict[str, ServingModel] = {}

    # -- tenants ----------------------------------------------------------------

    def get(self, tenant: str) -> ServingModel | None:
        with self._lock:
            return self._models.get(tenant)

    def put(self, serving: ServingModel, hold_previous: bool = False) -> ServingModel | None:
        """Serve ``serving`` for its tenant; with ``hold_previous`` the model it replaces is held."""
        with self._lock:
            old = self._models.get(serving.tenant)
            self._models[serving.tenant] = serving
            if hold_previous and old is not None and old.digest != serving.digest:
                self._held[serving.tenant] = old
            self._forget_unused()
            return old

    def remove(self, tenant: str) -> ServingModel | None:
        with self._lock:
            old = self._models.pop(tenant, None)
            self._held.pop(tenant, None)
            self._forget_unused()
            return old

    def all(self) -> list[ServingModel]:
        with self._lock:
            return [self._models[t] for t in sorted(self._models)]

    def expect(self, tenants: frozenset[str]) -> None:
        """Tenants the controller assigned: a request for one not yet loaded is 'not ready', not 'unknown'."""
        with self._lock:
            self._expected = tenants

    def is_expected(self, tenant: str) -> bool:
        with self._lock:
            return tenant in self._expected

    # -- the rollback copy of an update ----------------------------------------

    def hold(self, tenant: str) -> ServingModel | None:
        """Keep the tenant's serving model loaded and counted until :meth:`release`.

        Called before the update's new model is loaded, so that load has to fit
        beside it. An earlier hold of the tenant is released (its update was
        superseded). A serving model that was unloaded while idle is loaded
        again; if that does not fit, the hold is dropped and MemoryBudgetExceeded raised.
        """
        with self._lock:
            serving = self._models.get(tenant)
            self._held.pop(tenant, None)
            if serving is not None:
                self._held[tenant] = serving
            self._forget_unused()
        if serving is None:
            return None
        if isinstance(serving.model, PooledModel):
            try:
                # Outside the pool's lock: a reload takes the model's lock, then the pool's.
                serving.model.ensure_loaded()
            except BaseException:
                self.release(tenant)
                raise
        return serving

    def held(self, tenant: str) -> ServingModel | None:
        with self._lock:
            return self._held.get(tenant)

    def release(self, tenant: str) -> ServingModel | None:
        """The update ended: stop holding the tenant's previous model (unloaded unless it serves)."""
        with self._lock:
            released = self._held.pop(tenant, None)
            self._forget_unused()
            return released

    # -- loaded copies ----------------------------------------------------------

    def load(self, digest: str, path: Path, runtime: str, fmt: str = "onnx") -> LoadedModel:
        """The shared loaded copy of an artifact, loading it if no tenant has it yet."""
        with self._lock:
            shared = self._loaded.get(digest)
            if shared is not None:
                return shared
            size = path.stat().st_size

            def load() -> LoadedModel:
                return backend_for(runtime, fmt, self.threads, self.accelerator).load(path)

            pending = _Reservation(digest, size)
            self.reserve(pending)
            model = PooledModel(self, digest, size, load)
            self._loaded[digest] = model
            log.info("model loaded digest=%s size=%d loaded_bytes=%d", digest[:12], size, self.loaded_bytes())
            return model

    def reserve(self, model: PooledModel | _Reservation) -> None:
        """Make room for ``model``: unload idle ones if needed, else refuse with the figures."""
        with self._lock:
            if not self.budget_bytes:
                return
            others = [m for m in self._loaded.values() if m is not model and m.loaded]
            used = sum(m.size for m in others)
            if model.size > self.budget_bytes:
                raise MemoryBudgetExceeded(
                    f"model {model.digest[:12]} needs {model.size / MB:.1f} MB, more than the device's "
                    f"model memory budget of {self.budget_bytes / MB:.1f} MB"
                )
            held = self._held_digests()
            for victim in sorted(others, key=lambda m: m.last_used):
                if used + model.size <= self.budget_bytes:
                    break
                if victim.digest not in held and victim.unload_if_idle(0.0, self.clock()):
                    used -= victim.size
                    log.info("model unloaded for room digest=%s size=%d", victim.digest[:12], victim.size)
            if used + model.size > self.budget_bytes:
                raise MemoryBudgetExceeded(
                    f"model {model.digest[:12]} needs {model.size / MB:.1f} MB but {used / MB:.1f} MB of the "
                    f"{self.budget_bytes / MB:.1f} MB model memory budget are in use"
                    + self._held_note(model.digest)
                )

    def _held_digests(self) -> set[str]:
        return {s.digest for s in self._held.values()}

    def _held_note(self, digest: str) -> str:
        """Which of the memory in use is held for rollback, for the refusal's reason."""
        held = {
            s.digest: (s, m)
            for s in self._held.values()
            if s.digest != digest and (m := self._loaded.get(s.digest)) is not None and m.loaded
        }
        if not held:
            return ""
        parts = [
            f"{m.size / MB:.1f} MB by {s.model_name} {s.model_version} of tenant {s.tenant}"
            for s, m in (held[d] for d in sorted(held))
        ]
        return f" ({', '.join(parts)}, kept loaded for rollback until its update ends)"

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(m.size for m in self._loaded.values() if m.loaded)

    def sweep(self) -> list[str]:
        """Unload models idle for longer than ``idle_unload_s``; returns their digests."""
        if not self.idle_unload_s:
            return []
        now = self.clock()
        with self._lock:
            held = self._held_digests()
            models = [m for m in self._loaded.values() if m.digest not in held]
        unloaded = [m.digest for m in models if m.unload_if_idle(self.idle_unload_s, now)]
        for digest in unloaded:
            log.info("model unloaded after idle digest=%s idle_s=%.0f", digest[:12], self.idle_unload_s)
        return unloaded

    def _forget_unused(self) -> None:
        used = {s.digest for s in self._models.values()} | self._held_digests()
        for digest in [d for d in self._loaded if d not in used]:
            del self._loaded[digest]


@dataclass(frozen=True)
class _Reservation:
    """A model about to be loaded, as the budget sees it."""

    digest: str
    size: int
