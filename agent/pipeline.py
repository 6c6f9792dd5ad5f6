"""In-process tenant pipelines: source -> preprocessing -> fair scheduler -> model -> results.

One reader thread per tenant pulls samples from its source, prepares them and
hands them to the :class:`~agent.scheduler.Scheduler`. A live source's full lane
drops its oldest job (counted); a replayed file (video, WAV, CSV) at ``rate_hz``
0 waits for room instead, so a stateful model sees every sample. The scheduler's workers run the
tenant's live model, then its shadow candidate if one is loaded (tenant
``{id}.shadow`` in the pool), and deliver only the live result: to gRPC
StreamResults subscribers, to ``edgefleet/v1/devices/{id}/results/{tenant}``
over MQTT, or both; the live inference is then sketched and offered to the
tenant's capture policy (:mod:`agent.observe`). Samples never go through gRPC.
A gRPC Infer for a tenant with a shadow candidate hands its inputs and live
outputs to :meth:`Pipelines.offer_shadow` once the caller has its answer: the
candidate runs later as a job of its own lane, and the comparison lands in the
same shadow stats as the pipeline's.
A source that fails or ends is reported as an Event and reopened with jittered
backoff; other tenants are untouched.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
from edgefleet_proto import inference_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import PREFIX, validate_device_id

from agent import feeds, postprocess
from agent.backoff import backoff_delay
from agent.errors import AgentError, Overloaded, SourceError, TenantError
from agent.feeds import Feeder
from agent.observe import Observer
from agent.pool import ModelPool, ServingModel
from agent.preprocess import Prepared, Preprocessor
from agent.scheduler import Scheduler
from agent.sensors.base import REPLAYED_KINDS, Source, open_source
from agent.shadow import compare
from agent.signature import framed, framing_problem
from agent.telemetry import Inference, Inferences, InferenceStats, Origin, PipelineStats
from agent.tenants import TenantSpec, shadow_of
from agent.tensors import fill

log = logging.getLogger(__name__)

T = TypeVar("T")
EmitEvent = Callable[[str, str, str, dict[str, str]], None]
PublishResult = Callable[[str, bytes], None]
# Results a slow StreamResults reader may fall behind by before its oldest are dropped.
SUBSCRIBER_QUEUE = 64
# A failure repeating on every sample is logged at most this often per tenant.
WARN_EVERY_S = 10.0
# Calls a gRPC-only tenant may have waiting before the oldest is refused.
CALLER_QUEUE = 64
# A source that delivered this long before it failed or ended starts its backoff afresh.
STABLE_S = 10.0
# The shadow comparisons of gRPC calls wait in a lane ``{tenant}.shadow`` of their own, off the
# caller's latency path: under contention it gets this share against a tenant's weight 1 (low,
# yet never starved, or a busy device would gather no samples for its shadow gate), and past
# the bound it drops its oldest comparison (counted as the lane's ``dropped``). The bound is
# small because each waiting job keeps a call's inputs alive.
SHADOW_WEIGHT = 0.25
SHADOW_QUEUE = 8


def results_topic(device_id: str, tenant: str) -> str:
    return f"{PREFIX}/{validate_device_id(device_id)}/results/{tenant}"


@dataclass(frozen=True)
class Job:
    prepared: Prepared
    epoch: int
    queued_at: float


@dataclass(frozen=True)
class Call:
    """A gRPC caller's inference, run by a scheduler worker; the caller waits on ``future``."""

    run: Callable[[], Any]
    future: Future[Any]


@dataclass(frozen=True)
class ShadowJob:
    """A gRPC call's inputs and the live model's outputs, to run on the tenant's shadow candidate."""

    tenant: str
    live: ServingModel
    candidate: ServingModel
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    live_ms: float


@dataclass(frozen=True)
class _Route:
    """What a tenant's jobs need of its spec and serving model, worked out once for the pair:
    a job only checks that both are still the ones its route was made for."""

    spec: TenantSpec
    serving: ServingModel
    # The model input the tenant's source feeds, and whether the signature says it takes raw
    # audio frames (``NT``): sketched per band of their spectrum, not in the image layout.
    source: str
    audio: bool
    feeder: Feeder
    # The pool's name for the tenant's shadow candidate.
    shadow: str
    # The output the signature calls the model's class scores ("" when none does).
    scores: str
    # The tenant's post-processing with the outputs it names none for taken from the signature's
    # meanings (a model whose first output is its label, not its scores, is read right).
    post: postprocess.PostprocessSpec


class Subscription:
    """One StreamResults caller's results, bounded: past ``bound`` the oldest waiting is dropped.

    A ``queue.SimpleQueue`` underneath: handing a result to the waiting caller is one wake in C,
    where ``queue.Queue`` runs a Python condition on both sides (about 10 us per result).
    Producers trim under a lock of their own; a caller taking results meanwhile can make one
    trim drop a result more than the bound asks, only when the caller is that far behind.
    """

    def __init__(self, bound: int = SUBSCRIBER_QUEUE) -> None:
        self._items: queue.SimpleQueue[inference_pb2.Result | None] = queue.SimpleQueue()
        self._bound = bound
        self._trim = threading.Lock()

    def put(self, item: inference_pb2.Result | None) -> None:
        items = self._items
        items.put(item)
        if items.qsize() > self._bound:
            with self._trim:
                while items.qsize() > self._bound:
                    try:
                        items.get_nowait()
                    except queue.Empty:
                        break

    def get(self, timeout: float | None = None) -> inference_pb2.Result | None:
        """The oldest result; ``queue.Empty`` after ``timeout`` s without one."""
        return self._items.get(timeout=timeout)

    def get_nowait(self) -> inference_pb2.Result | None:
        return self._items.get_nowait()

    def qsize(self) -> int:
        return self._items.qsize()


class ResultHub:
    """Fan-out of a tenant's results to its StreamResults callers; a slow caller loses its oldest.

    The subscriber lists are replaced, never changed in place, so publishing (once per
    inference) reads them without the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, tuple[Subscription, ...]] = {}

    def subscribe(self, tenant: str) -> Subscription:
        q = Subscription(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers[tenant] = (*self._subscribers.get(tenant, ()), q)
        return q

    def unsubscribe(self, tenant: str, q: Subscription) -> None:
        with self._lock:
            subs = tuple(s for s in self._subscribers.get(tenant, ()) if s is not q)
            if subs:
                self._subscribers[tenant] = subs
            else:
                self._subscribers.pop(tenant, None)

    def wanted(self, tenant: str) -> bool:
        return tenant in self._subscribers

    def publish(self, tenant: str, result: inference_pb2.Result) -> None:
        for q in self._subscribers.get(tenant, ()):
            q.put(result)

    def close(self) -> None:
        """Wake every caller so the streams end (shutdown)."""
        with self._lock:
            subs = [q for qs in self._subscribers.values() for q in qs]
        for q in subs:
            q.put(None)


class _Reader:
    """The thread that feeds one tenant from its source."""

    def __init__(self, pipelines: Pipelines, spec: TenantSpec) -> None:
        self.p = pipelines
        self.spec = spec
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"source-{spec.id}", daemon=True)
        self.epoch = 0
        # When the current run of the source delivered its first sample.
        self._stable_since: float | None = None
        # The digest of the model the preprocessing was framed for, and the preprocessor.
        self._prep: tuple[str, Preprocessor] | None = None

    def _run(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            self._stable_since = None
            try:
                self._read_until_end()
                reason = "source ended"
            except SourceError as exc:
                reason = str(exc)
            except AgentError as exc:
                reason = f"preprocessing failed: {exc}"
            except Exception as exc:
                # A driver or decoder bug must not end the tenant: report it, retry.
                log.exception("source crashed device=%s tenant=%s", self.p.device_id, self.spec.id)
                reason = f"source crashed: {type(exc).__name__}: {exc}"
            if self.stop.is_set():
                return
            # A source that ran well for a while and then dropped is a new problem: retry
            # soon. One that keeps failing or ending quickly (a short file) backs off.
            if self._stable_since is not None and time.monotonic() - self._stable_since >= STABLE_S:
                attempt = 0
            attempt += 1
            delay = backoff_delay(attempt)
            self.p.stats.source_failed(self.spec.id)
            self.p.source_lost(self.spec, reason, attempt, delay)
            self.stop.wait(delay)

    def _read_until_end(self) -> None:
        assert self.spec.source is not None
        source: Source = open_source(self.spec.source)
        self.epoch += 1
        # A new run of the source starts without the partial window of the last one.
        self._prep = None
        period = 1.0 / self.spec.rate_hz if self.spec.rate_hz else 0.0
        # A file at rate 0 waits for room in the lane (back-pressure) instead of dropping.
        replayed = not period and self.spec.source.kind in REPLAYED_KINDS
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                sample = source.read()
                if sample is None:
                    return
                if self._stable_since is None:
                    self._stable_since = time.monotonic()
                self.p.stats.sample(self.spec.id)
                for prepared in self._preprocessor().feed(sample):
                    if replayed:
                        self.p.submit_when_room(self.spec.id, self._job(prepared), self.stop)
                    else:
                        self.p.submit(self.spec.id, Job(prepared, self.epoch, time.perf_counter()))
                if period:
                    next_at = max(next_at + period, time.monotonic() - period)
                    self.stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            source.close()

    def _job(self, prepared: Prepared) -> Callable[[], Job]:
        epoch = self.epoch
        return lambda: Job(prepared, epoch, time.perf_counter())

    def _preprocessor(self) -> Preprocessor:
        """The tenant's preprocessing, framed as its serving model's signature says (an audio
        input's length); made again, and the lane made serial for carried state, when the
        model changes."""
        serving = self.p.pool.get(self.spec.id)
        digest = serving.digest if serving is not None else ""
        if self._prep is not None and self._prep[0] == digest:
            return self._prep[1]
        signature = serving.signature if serving is not None else None
        pre = framed(self.spec.preprocess, signature)
        kept = self._prep is not None and self._prep[1].spec == pre
        preprocessor = self._prep[1] if self._prep is not None and kept else Preprocessor(pre)
        self._prep = (digest, preprocessor)
        if signature is not None and signature.stateful and not self.spec.inputs:
            self.p.serialize(self.spec)
        return preprocessor


class Pipelines:
    def __init__(
        self,
        device_id: str,
        pool: ModelPool,
        workers: int,
        stats: PipelineStats,
        emit: EmitEvent,
        publish: PublishResult,
        hub: ResultHub,
        observer: Observer | None = None,
        cost_clock: Callable[[], float] = time.perf_counter,
        inferences: Inferences | None = None,
    ) -> None:
        self.device_id = device_id
        # Where every inference run here is counted, live or shadow (gRPC calls count in the API).
        self.inferences = inferences or Inferences(InferenceStats(), stats)
        # Drift sketches and data capture of every live inference (the closed loop).
        self.observer = observer
        self.pool = pool
        self.stats = stats
        self.emit = emit
        self.publish = publish
        self.hub = hub
        self.scheduler = Scheduler(workers, self._run_job, clock=cost_clock)
        self._lock = threading.Lock()
        self._specs: dict[str, TenantSpec] = {}
        self._readers: dict[str, _Reader] = {}
        # Tenants that only call over gRPC: a lane of weight 1 each, made on first call.
        self._callers: set[str] = set()
        # Lanes of gRPC shadow comparisons, ``{tenant}.shadow``, made on the first one.
        self._shadow_lanes: set[str] = set()
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}
        # Tenants skipping their samples for want of an active model: how many so far.
        self._waiting: dict[str, int] = {}
        # Each tenant's constants and carried state (agent.feeds), and what its feeds and
        # post-processing lack in a model, checked once per (tenant, artifact).
        self._feeders: dict[str, Feeder] = {}
        # Feeders of tenants that declare no inputs, from their serving model's signature.
        self._signed_feeders: dict[tuple[str, str], Feeder] = {}
        self._fits: dict[tuple[str, str], tuple[str, str]] = {}
        # Per tenant, the route of its current spec and model (written by the workers).
        self._routes: dict[str, _Route] = {}

    def start(self) -> None:
        self.scheduler.start()

    def specs(self) -> dict[str, TenantSpec]:
        with self._lock:
            return dict(self._specs)

    def apply(self, tenants: tuple[TenantSpec, ...]) -> None:
        """Run exactly these tenants: start new ones, restart changed ones, stop removed ones."""
        with self._lock:
            wanted = {t.id: t for t in tenants}
            for tenant in [t for t in self._specs if wanted.get(t) != self._specs[t]]:
                reader = self._readers.pop(tenant, None)
                if reader is not None:
                    reader.stop.set()
                if tenant not in wanted:
                    self._dropped(tenant, self.scheduler.remove(tenant))
                del self._specs[tenant]
                self._feeders.pop(tenant, None)
                self._signed_feeders = {k: f for k, f in self._signed_feeders.items() if k[0] != tenant}
                self._waiting.pop(tenant, None)
                self._routes.pop(tenant, None)
                log.info("tenant pipeline stopped device=%s tenant=%s", self.device_id, tenant)
            for tenant, spec in sorted(wanted.items()):
                if tenant in self._specs:
                    continue
                self._callers.discard(tenant)
                self._specs[tenant] = spec
                self._feeders[tenant] = Feeder(spec.inputs)
                self._fits = {k: v for k, v in self._fits.items() if k[0] != tenant}
                stateful = any(f.role == "state" for f in spec.inputs)
                self.scheduler.configure(tenant, spec.weight, spec.queue, serial=stateful)
                if spec.source is not None:
                    reader = self._readers[tenant] = _Reader(self, spec)
                    reader.thread.start()
                log.info(
                    "tenant pipeline started device=%s tenant=%s model=%s source=%s weight=%g queue=%d",
                    self.device_id,
                    tenant,
                    spec.model or "-",
                    spec.source.kind if spec.source else "-",
                    spec.weight,
                    spec.queue,
                )

    def serialize(self, spec: TenantSpec) -> None:
        """Run the tenant's jobs one at a time, in order: its model carries state between runs."""
        with self._lock:
            if self._specs.get(spec.id) is spec:
                self.scheduler.configure(spec.id, spec.weight, spec.queue, serial=True)

    def _feeds(self, spec: TenantSpec, serving: ServingModel) -> tuple[feeds.InputFeed, ...]:
        """The tenant's declared inputs, else the constants and state of its model's signature."""
        if spec.inputs or serving.signature is None:
            return spec.inputs
        return serving.signature.feeds()

    def _feeder(self, spec: TenantSpec, serving: ServingModel) -> Feeder:
        """The tenant's feeder; one made from a model's signature serves only that model."""
        if spec.inputs or serving.signature is None:
            return self._feeders.get(spec.id) or Feeder(spec.inputs)
        key = (spec.id, serving.digest)
        with self._lock:
            feeder = self._signed_feeders.get(key)
            if feeder is None:
                self._signed_feeders = {k: f for k, f in self._signed_feeders.items() if k[0] != spec.id}
                feeder = self._signed_feeders[key] = Feeder(serving.signature.feeds())
            return feeder

    def submit(self, tenant: str, job: Job) -> None:
        dropped = self.scheduler.submit(tenant, job)
        self._dropped(tenant, dropped)

    def submit_when_room(self, tenant: str, make: Callable[[], Job], stop: threading.Event) -> None:
        """Queue a replayed file's job once the tenant's lane has room (see Scheduler.submit_when_room)."""
        self._dropped(tenant, self.scheduler.submit_when_room(tenant, make, stop))

    def _dropped(self, tenant: str, dropped: list[Any]) -> None:
        if not dropped:
            return
        self.stats.dropped(tenant, len(dropped))
        for item in dropped:
            if isinstance(item, Call):
                item.future.set_exception(Overloaded(f"tenant {tenant!r} is over its queue bound; try again"))

    def call(self, tenant: str, run: Callable[[], T], timeout: float) -> T:
        """Run ``run`` on the scheduler as one of ``tenant``'s jobs (a gRPC Infer) and wait for it.

        Local apps calling over gRPC get the same weighted share as the pipelines,
        so a greedy caller cannot starve a camera tenant. The caller records the
        inference, since only it knows the model version that ran and how it ended.
        When a share is free and no job waits, the caller's thread runs the job itself,
        charged to the tenant as a worker's run would be (no hand-off to a worker and back).
        """
        with self._lock:
            if tenant not in self._specs and tenant not in self._callers:
                self._callers.add(tenant)
                self.scheduler.configure(tenant, 1.0, CALLER_QUEUE)
        ticket = self.scheduler.claim(tenant, run)
        if ticket is not None:
            clock = self.scheduler.clock
            start = clock()
            try:
                return run()
            finally:
                self.scheduler.release(ticket, clock() - start)
        call: Call = Call(run, Future())
        self._dropped(tenant, self.scheduler.submit(tenant, call))
        try:
            result: T = call.future.result(timeout)
        except FutureTimeout:
            call.future.cancel()
            raise Overloaded(f"tenant {tenant!r}: no worker was free within {timeout:.1f} s") from None
        return result

    def offer_shadow(
        self,
        tenant: str,
        live: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        live_ms: float,
    ) -> None:
        """Queue a gRPC call's shadow comparison if the tenant has a candidate; never blocks.

        Called after the live answer was computed, so the caller never waits for the
        candidate; the caller's arrays are not changed afterwards (they are copies).
        """
        lane = shadow_of(tenant)
        candidate = self.pool.get(lane)
        with self._lock:
            if candidate is None:
                if lane in self._shadow_lanes:
                    # The candidate was cleared: what still waits has nothing to run on.
                    self._shadow_lanes.discard(lane)
                    self.scheduler.remove(lane)
                return
            if lane not in self._shadow_lanes:
                self._shadow_lanes.add(lane)
                self.scheduler.configure(lane, SHADOW_WEIGHT, SHADOW_QUEUE)
        job = ShadowJob(tenant, live, candidate, inputs, outputs, live_ms)
        dropped = self.scheduler.submit(lane, job)
        if dropped:
            self.stats.dropped(lane, len(dropped))
            self._warn(
                (tenant, "shadow-dropped"),
                "shadow comparison dropped device=%s tenant=%s model=%s version=%s queue=%d",
                self.device_id,
                tenant,
                candidate.model_name,
                candidate.model_version,
                SHADOW_QUEUE,
            )

    def source_lost(self, spec: TenantSpec, reason: str, attempt: int, delay: float) -> None:
        assert spec.source is not None
        log.warning(
            "source lost device=%s tenant=%s kind=%s uri=%s attempt=%d retry_in_s=%.1f error=%s",
            self.device_id,
            spec.id,
            spec.source.kind,
            spec.source.uri,
            attempt,
            delay,
            reason,
        )
        attrs = {
            "tenant": spec.id,
            "source": spec.source.kind,
            "uri": spec.source.uri,
            "attempt": str(attempt),
            "retry_in_s": f"{delay:.1f}",
        }
        self.emit("source_lost", "warning", reason, attrs)

    def _warn(self, key: tuple[str, str], message: str, *args: object) -> None:
        """A failure that repeats on every sample is logged once per WARN_EVERY_S (errors are counted)."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._warned.get(key, (-WARN_EVERY_S, 0))
            if now - last < WARN_EVERY_S:
                self._warned[key] = (last, suppressed + 1)
                return
            self._warned[key] = (now, 0)
        log.warning(message + " repeated=%d", *args, suppressed)

    def _skip_without_model(self, spec: TenantSpec) -> None:
        """A tenant declared before its model is active: its samples are skipped, logged once."""
        tenant = spec.id
        self.stats.skipped_no_model(tenant)
        with self._lock:
            skipped = self._waiting.get(tenant)
            self._waiting[tenant] = (skipped or 0) + 1
        if skipped is None:
            log.info(
                "tenant has no active model device=%s tenant=%s want=%s: its samples are skipped "
                "(counted as skipped_no_model, not errors) until one is active",
                self.device_id,
                tenant,
                spec.model or "-",
            )

    def _model_arrived(self, tenant: str, serving: ServingModel) -> None:
        if tenant not in self._waiting:  # the common case, without the lock
            return
        with self._lock:
            skipped = self._waiting.pop(tenant, None)
        if skipped is not None:
            log.info(
                "tenant model active device=%s tenant=%s model=%s version=%s skipped=%d",
                self.device_id,
                tenant,
                serving.model_name,
                serving.model_version,
                skipped,
            )

    # -- the scheduler's runner -------------------------------------------------

    def _run_job(self, tenant: str, job: Job | Call | ShadowJob) -> None:
        if not isinstance(job, Job):
            self._run_other(job)
            return
        spec = self._specs.get(tenant)
        serving = self.pool.get(tenant)
        if spec is None:
            # The tenant was removed after a worker took this job: nothing failed, the sample
            # just has no pipeline any more. Counted as dropped, like the jobs still queued
            # when the tenant went (apply() drops those), so its last window stays honest.
            self.stats.dropped(tenant, 1)
            return
        if serving is None:
            self._skip_without_model(spec)
            return
        self._model_arrived(tenant, serving)
        route = self._routes.get(tenant)
        if route is None or route.spec is not spec or route.serving is not serving:
            route = self._new_route(spec, serving)
            if route is None:
                return
        candidate = self.pool.get(route.shadow)
        fed: dict[str, np.ndarray] = {}

        def feeding(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            fed.update(inputs)  # the candidate runs on exactly what the live model was fed
            return serving.model.run(inputs)

        model_run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = (
            serving.model.run if candidate is None else feeding
        )

        array = job.prepared.array
        try:
            start = time.perf_counter()
            outputs = route.feeder.run(route.source, array, job.epoch, model_run)
            end = time.perf_counter()
        except AgentError as exc:
            self._inference_failed(spec, serving, exc)
            return
        latency_ms = (end - job.queued_at) * 1000.0
        observer = self.observer
        name, version = serving.model_name, serving.model_version
        weight = observer.admit(tenant, name, version) if observer is not None else 0
        want_grpc = "grpc" in spec.results and self.hub.wanted(tenant)
        wanted = want_grpc or "mqtt" in spec.results
        sketched = weight and observer is not None and observer.sketcher.wants(tenant, name, version)
        outcome = self._outcome(spec, route.post, job, outputs) if wanted or sketched else None
        if wanted:
            self._deliver(spec, serving, job, outputs, latency_ms, outcome, want_grpc)
        # Counted once the result is on its way: the caller waiting for it wakes meanwhile.
        self._record(tenant, serving, Origin.PIPELINE, latency_ms, ok=True)
        if weight and observer is not None:
            # The preprocessing made the image, so its layout is known, not read from the shape;
            # a post-processed tenant is sketched on the scores its consumers get.
            layout = "nt" if route.audio and array.ndim == 2 else spec.preprocess.layout
            observer.offer(tenant, name, version, array, outputs, layout, outcome, weight, route.scores)
        if candidate is not None:
            self._compare(tenant, serving, candidate, fed, outputs, (end - start) * 1000.0)

    def _run_other(self, job: Call | ShadowJob) -> None:
        """A gRPC caller's inference, or the shadow comparison of one."""
        if isinstance(job, Call):
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.run())
                except BaseException as exc:  # handed to the caller, who turns it into a status
                    job.future.set_exception(exc)
            return
        self._compare(job.tenant, job.live, job.candidate, job.inputs, job.outputs, job.live_ms)

    def _new_route(self, spec: TenantSpec, serving: ServingModel) -> _Route | None:
        """The tenant's route to its serving model; None (the job counted as failed) while the
        model is not the one the tenant declares, or does not fit its feeds."""
        tenant = spec.id
        if spec.model and serving.model_name != spec.model:
            self.inferences.tenant_failed(tenant)
            self._warn(
                (tenant, "mismatch"),
                "model mismatch device=%s tenant=%s want=%s serving=%s",
                self.device_id,
                tenant,
                spec.model,
                serving.model_name,
            )
            return None
        try:
            source = self._fit(spec, serving)
        except TenantError as exc:
            self._inference_failed(spec, serving, exc)
            return None
        route = _Route(
            spec,
            serving,
            source,
            _audio_source(serving, source),
            self._feeder(spec, serving),
            shadow_of(tenant),
            serving.signature.scores() if serving.signature is not None else "",
            _postprocess_by_meaning(spec.postprocess, serving),
        )
        self._routes[tenant] = route
        return route

    def _inference_failed(self, spec: TenantSpec, serving: ServingModel, exc: AgentError) -> None:
        self._record(spec.id, serving, Origin.PIPELINE, 0.0, ok=False)
        self._warn(
            (spec.id, "inference"),
            "inference failed device=%s tenant=%s model=%s version=%s error=%s",
            self.device_id,
            spec.id,
            serving.model_name,
            serving.model_version,
            exc,
        )

    def _fit(self, spec: TenantSpec, serving: ServingModel) -> str:
        """The input the tenant's source feeds, once its feeds and post-processing fit the model.
        A misfit raises a TenantError naming the input or output for every sample until the
        tenant or the model changes; it is checked, and reported as an event, once."""
        key = (spec.id, serving.digest)
        fit = self._fits.get(key)
        if fit is None:
            inputs = [t.name for t in serving.model.inputs]
            outputs = [t.name for t in serving.model.outputs]
            fed = self._feeds(spec, serving)
            signed = serving.signature.source() if serving.signature is not None else None
            declared = spec.preprocess.input or (signed.name if signed is not None else "")
            try:
                name = feeds.source_input(fed, inputs, declared)
                problems = feeds.check(fed, inputs, outputs, name) if fed else []
            except TenantError as exc:
                name, problems = "", [str(exc)]
            problems += postprocess.check(spec.postprocess, outputs)
            framing = framing_problem(spec.preprocess, serving.signature)
            problems += [framing] if framing else []
            fit = self._fits[key] = (name, "; ".join(problems))
            if problems:
                self.emit(
                    "tenant_misfit",
                    "error",
                    f"tenant {spec.id!r} does not fit {serving.model_name} {serving.model_version}: {fit[1]}",
                    {"tenant": spec.id, "model": serving.model_name, "version": serving.model_version},
                )
        if fit[1]:
            raise TenantError(fit[1])
        return fit[0]

    def _outcome(
        self, spec: TenantSpec, post: postprocess.PostprocessSpec, job: Job, outputs: dict[str, np.ndarray]
    ) -> postprocess.Outcome | None:
        """The tenant's post-processed result; None without post-processing, or when it failed
        (logged, rate-limited: the same failure repeats on every sample)."""
        if not spec.postprocess.kind:
            return None
        try:
            return self._postprocess(spec, post, job, outputs)
        except TenantError as exc:
            self._warn(
                (spec.id, "postprocess"),
                "postprocess failed device=%s tenant=%s error=%s",
                self.device_id,
                spec.id,
                exc,
            )
            return None

    def _deliver(
        self,
        spec: TenantSpec,
        serving: ServingModel,
        job: Job,
        outputs: dict[str, np.ndarray],
        latency_ms: float,
        outcome: postprocess.Outcome | None,
        want_grpc: bool,
    ) -> None:
        """Send the result to the tenant's StreamResults callers (``want_grpc``) and over MQTT."""
        if outcome is None and spec.postprocess.kind:
            return  # post-processing failed (logged): there is no result to deliver
        result = inference_pb2.Result(
            tenant=spec.id,
            model_name=serving.model_name,
            model_version=serving.model_version,
            seq=job.prepared.seq,
            captured_at_ms=job.prepared.captured_at_ms,
            latency_ms=latency_ms,
            source_epoch=job.epoch,
        )
        if outcome is not None:
            for c in outcome.classes:
                result.classes.add(index=c.index, label=c.label, score=c.score)
            for d in outcome.detections:
                x0, y0, x1, y1 = d.box
                result.detections.add(index=d.index, label=d.label, score=d.score, x0=x0, y0=y0, x1=x1, y1=y1)
            if outcome.mask is not None:
                fill(result.mask, outcome.mask, "mask")
        if not spec.postprocess.kind or spec.postprocess.raw:
            for name, array in outputs.items():
                fill(result.outputs[name], array, f"output {name!r}")
        if want_grpc:
            self.hub.publish(spec.id, result)
        if "mqtt" in spec.results:
            self.publish(results_topic(self.device_id, spec.id), encode(result))

    @staticmethod
    def _postprocess(
        spec: TenantSpec, post: postprocess.PostprocessSpec, job: Job, outputs: dict[str, np.ndarray]
    ) -> postprocess.Outcome:
        if not spec.postprocess.kind:
            return postprocess.Outcome()
        pre = spec.preprocess
        shape = job.prepared.array.shape
        if pre.resize is not None:
            input_hw = pre.resize
        elif len(shape) >= 3:
            input_hw = (shape[-2], shape[-1]) if pre.layout == "nchw" else (shape[-3], shape[-2])
        else:
            input_hw = (1, 1)
        return postprocess.apply(outputs, post, input_hw, pre.layout, job.prepared.letterbox)

    def _compare(
        self,
        tenant: str,
        live: ServingModel,
        candidate: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        live_ms: float,
    ) -> None:
        """Run the shadow candidate on the live model's inputs and record how far it is."""
        try:
            start = time.perf_counter()
            shadow_out = candidate.model.run(inputs)
            candidate_ms = (time.perf_counter() - start) * 1000.0
            comparison = compare(outputs, shadow_out, live.signature.scores() if live.signature else "")
        except (AgentError, ValueError) as exc:  # e.g. no room to reload it: the live side goes on
            # Outputs that do not match the live model's count as a failure too: the tenant's
            # consumers could not read them if the candidate went live.
            self._record(shadow_of(tenant), candidate, Origin.SHADOW, 0.0, ok=False)
            self._warn(
                (tenant, "shadow"),
                "shadow failed device=%s tenant=%s model=%s version=%s error=%s",
                self.device_id,
                tenant,
                candidate.model_name,
                candidate.model_version,
                exc,
            )
            return
        self._record(shadow_of(tenant), candidate, Origin.SHADOW, candidate_ms, ok=True)
        self.stats.shadow(
            tenant,
            live.model_version,
            (candidate.model_name, candidate.model_version),
            comparison.top1,
            comparison.mean_abs_deviation,
            candidate_ms,
            live_ms,
            comparison.rows,
        )

    def _record(
        self, tenant: str, serving: ServingModel, origin: Origin, latency_ms: float, ok: bool
    ) -> None:
        self.inferences.record(
            Inference(tenant, serving.model_name, serving.model_version, origin, latency_ms, ok)
        )

    def telemetry_inputs(self) -> tuple[dict[str, float], dict[str, float]]:
        """(weights, busy seconds) per tenant for the telemetry window."""
        weights, busy = {}, {}
        with self._lock:
            lanes = (
                {t: s.weight for t, s in self._specs.items()}
                | dict.fromkeys(self._callers, 1.0)
                | dict.fromkeys(self._shadow_lanes, SHADOW_WEIGHT)
            )
        for tenant, weight in lanes.items():
            weights[tenant], busy[tenant] = weight, self.scheduler.drain_busy(tenant)
        return weights, busy

    def stop(self, timeout: float) -> bool:
        """Stop the sources, let in-flight and queued work finish for up to ``timeout`` s."""
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.stop.set()
        finished = self.scheduler.stop(timeout)
        self.hub.close()
        return finished


def _postprocess_by_meaning(
    post: postprocess.PostprocessSpec, serving: ServingModel
) -> postprocess.PostprocessSpec:
    """``post`` with the outputs it leaves unnamed taken from the serving model's signature."""
    if (
        not post.kind
        or serving.signature is None
        or (post.output and (post.boxes_output or post.kind != "ssd"))
    ):
        return post
    values, boxes = serving.signature.postprocess_outputs(post.kind)
    return replace(post, output=post.output or values, boxes_output=post.boxes_output or boxes)


def _audio_source(serving: ServingModel, source_name: str) -> bool:
    """Whether the model's signature says its source input takes raw audio frames (``NT``): a
    tenant's 2-D inputs are then sketched per band of their spectrum, images in the
    preprocessing's layout."""
    role = serving.signature.input(source_name) if serving.signature is not None else None
    return role is not None and role.layout == "NT"
