"""The local inference API: gRPC InferenceService and TenantResults on a Unix socket.

Handlers are thin: check the caller's tenant token (:class:`TenantAuth`), decode
tensors (:mod:`agent.tensors`), find the tenant's model in the pool, fill in the
constants and initial states the caller left out from the version's signature, run it, and
record the inference (latency or error) in :class:`agent.telemetry.Inferences`,
where pipelines and the shadow lane record theirs. Every failure becomes a gRPC
status with a message; nothing a caller sends can crash the agent.

Who may call: the socket's mode (``[api] socket_mode``, 0660 by default) and
group (``[api] socket_group``) keep out users outside that group; within it, the token in the
``x-edgefleet-token`` metadata names the tenant, and a tenant can only use its
own model and results. A tenant declared without a token (the foundation's
``default``) is open to anyone who can reach the socket unless
``[api] require_token`` is set. Shadow candidates are never served, but a
tenant's calls are offered to its shadow candidate (``shadow``, in the service
:meth:`agent.pipeline.Pipelines.offer_shadow`) once the live answer is ready.
"""

from __future__ import annotations

import grp
import logging
import os
import queue
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.errors import ConfigError, InferenceError, InvalidInput, Overloaded, TensorCodecError
from agent.observe import Observer
from agent.pipeline import ResultHub
from agent.pool import ModelPool, ServingModel
from agent.runtime import TensorSpec
from agent.telemetry import Inference, Inferences, Origin
from agent.tenants import DEFAULT_TENANT, TenantSpec, is_shadow
from agent.tensors import from_numpy, to_numpy

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TOKEN_METADATA = "x-edgefleet-token"
# How often a StreamResults call checks that its caller is still there.
STREAM_POLL_S = 0.5
# Longest a call waits for its inference when the caller set no deadline.
DEFAULT_CALL_TIMEOUT_S = 30.0


class TenantAuth:
    """Which tenant a call may act for, from its token and the tenants declared now."""

    def __init__(self, specs: Callable[[], dict[str, TenantSpec]], require_token: bool = False) -> None:
        self.specs = specs
        self.require_token = require_token

    def caller(self, context: Any) -> str | None:
        """The tenant whose token the call carries; None without a token; aborts on a bad one."""
        token = next((v for k, v in context.invocation_metadata() or () if k == TOKEN_METADATA), None)
        if token is None:
            return None
        for spec in self.specs().values():
            if spec.accepts(str(token)):
                return spec.id
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, "the token matches no tenant on this device")

    def check(self, context: Any, tenant: str) -> None:
        """Abort unless the caller may use ``tenant``'s model and results."""
        if is_shadow(tenant):
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{tenant!r} is a shadow candidate; it is not served",
            )
        caller = self.caller(context)
        if caller is not None and caller != tenant:
            log.warning("call refused caller=%s tenant=%s reason=foreign-tenant", caller, tenant)
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token of tenant {caller!r} cannot use tenant {tenant!r}",
            )
        if caller is None:
            spec = self.specs().get(tenant)
            if self.require_token or (spec is not None and spec.token_sha256):
                _abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"tenant {tenant!r} needs its token in the {TOKEN_METADATA!r} metadata",
                )

    def visible(self, context: Any, tenant: str) -> bool:
        if is_shadow(tenant):
            return False
        caller = self.caller(context)
        if caller is not None:
            return caller == tenant
        spec = self.specs().get(tenant)
        return not self.require_token and not (spec is not None and spec.token_sha256)


def _specs(specs: list[TensorSpec]) -> list[inference_pb2.TensorSpec]:
    return [inference_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in specs]


T = TypeVar("T")
RunOn = Callable[[str, Callable[[], Any], float], Any]
# (tenant, live model, inputs, live outputs, live run ms): hands a call to the shadow comparison.
OfferShadow = Callable[[str, ServingModel, dict[str, np.ndarray], dict[str, np.ndarray], float], None]


def _inline(tenant: str, work: Callable[[], T], timeout: float) -> T:
    return work()


class InferenceApi(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        pool: ModelPool,
        inferences: Inferences,
        broker_connected: Callable[[], bool],
        auth: TenantAuth | None = None,
        run: RunOn | None = None,
        observer: Observer | None = None,
        shadow: OfferShadow | None = None,
    ) -> None:
        self.pool = pool
        # Where a call goes to be compared with the tenant's shadow candidate, if it has one.
        self.shadow = shadow
        # A caller's inferences feed the drift sketches and data capture like a pipeline's.
        self.observer = observer
        # Where each call counts, for its model version and its tenant, like a pipeline's inference.
        self.inferences = inferences
        self.broker_connected = broker_connected
        self.auth = auth or TenantAuth(dict)
        # Where a call's inference runs: the fair scheduler in the service, inline without one.
        self.run: RunOn = run or _inline

    def Infer(self, request: inference_pb2.InferRequest, context: Any) -> inference_pb2.InferResponse:
        tenant = request.tenant or DEFAULT_TENANT
        self.auth.check(context, tenant)
        serving = self.pool.get(tenant)
        if serving is None:
            if self.pool.is_expected(tenant):
                _abort(
                    context, grpc.StatusCode.FAILED_PRECONDITION, f"tenant {tenant!r} has no model loaded yet"
                )
            _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown tenant {tenant!r}")
        code, message = grpc.StatusCode.OK, ""
        start = time.perf_counter()
        response = inference_pb2.InferResponse()
        try:
            inputs = {name: to_numpy(t, f"input {name!r}") for name, t in request.inputs.items()}
            if serving.signature is not None:
                # Constants and initial states the caller left out, as a tenant pipeline feeds
                # them. No state is kept between calls (a call names no stream): a caller that
                # streams sends each answer's state output back as the next call's state.
                inputs = serving.signature.completed(inputs, serving.model.inputs)
            names = list(request.output_names)
            timeout = context.time_remaining() or DEFAULT_CALL_TIMEOUT_S

            def live() -> tuple[dict[str, np.ndarray], float]:
                begin = time.perf_counter()
                out = serving.model.run(inputs, names)
                return out, (time.perf_counter() - begin) * 1000.0

            outputs, live_ms = self.run(tenant, live, min(timeout, DEFAULT_CALL_TIMEOUT_S))
            latency_ms = (time.perf_counter() - start) * 1000.0
            response = inference_pb2.InferResponse(
                model_name=serving.model_name,
                model_version=serving.model_version,
                latency_ms=latency_ms,
            )
            for name, array in outputs.items():
                response.outputs[name].CopyFrom(from_numpy(array, f"output {name!r}"))
            if self.observer is not None:
                self._observe(tenant, serving, inputs, outputs)
        except (TensorCodecError, InvalidInput) as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Overloaded as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except InferenceError as exc:
            code, message = grpc.StatusCode.INTERNAL, str(exc)
        except Exception as exc:
            log.exception("inference crashed tenant=%s model=%s", tenant, serving.model_name)
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
        ok = code == grpc.StatusCode.OK
        elapsed = (time.perf_counter() - start) * 1000.0
        self.inferences.record(
            Inference(tenant, serving.model_name, serving.model_version, Origin.GRPC, elapsed, ok)
        )
        if ok and self.shadow is not None:
            self._offer_shadow(tenant, serving, inputs, outputs, live_ms)
        if not ok:
            log.info(
                "inference refused tenant=%s model=%s version=%s code=%s error=%s",
                tenant,
                serving.model_name,
                serving.model_version,
                code.name,
                message,
            )
            _abort(context, code, message)
        return response

    def _observe(
        self,
        tenant: str,
        serving: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Sketch the input the version's signature says a source feeds, in its layout; without
        a signature, the model's first input, whose layout the drift spec tells."""
        assert self.observer is not None
        source = serving.signature.source() if serving.signature is not None else None
        name = source.name if source is not None else ""
        if name not in inputs:
            name, source = (serving.model.inputs[0].name if serving.model.inputs else ""), None
        if name in inputs:
            layout = source.layout if source is not None else ""
            self.observer.observe(
                tenant, serving.model_name, serving.model_version, inputs[name], outputs, layout=layout
            )

    def _offer_shadow(
        self,
        tenant: str,
        serving: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        live_ms: float,
    ) -> None:
        assert self.shadow is not None
        try:
            self.shadow(tenant, serving, inputs, outputs, live_ms)
        except Exception:
            # The answer is ready and must reach the caller whatever the comparison does.
            log.exception("shadow offer failed tenant=%s model=%s", tenant, serving.model_name)

    def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    tenant=s.tenant,
                    model_name=s.model_name,
                    model_version=s.model_version,
                    artifact_digest=s.digest,
                    runtime=s.runtime,
                    inputs=_specs(s.model.inputs),
                    outputs=_specs(s.model.outputs),
                )
                for s in self._visible(context)
            ]
        )

    def _visible(self, context: Any) -> list[ServingModel]:
        return [s for s in self.pool.all() if self.auth.visible(context, s.tenant)]

    def Health(self, request: inference_pb2.HealthRequest, context: Any) -> inference_pb2.HealthResponse:
        loaded = len([s for s in self.pool.all() if not is_shadow(s.tenant)])
        return inference_pb2.HealthResponse(
            status="serving" if loaded else "starting",
            broker_connected=self.broker_connected(),
            models_loaded=loaded,
        )


class ResultsApi(inference_pb2_grpc.TenantResultsServicer):
    """StreamResults: a tenant's pipeline results as they are produced."""

    def __init__(self, hub: ResultHub, specs: Callable[[], dict[str, TenantSpec]], auth: TenantAuth) -> None:
        self.hub = hub
        self.specs = specs
        self.auth = auth

    def StreamResults(
        self, request: inference_pb2.StreamResultsRequest, context: Any
    ) -> Iterator[inference_pb2.Result]:
        tenant = request.tenant or DEFAULT_TENANT
        self.auth.check(context, tenant)
        spec = self.specs().get(tenant)
        if spec is None or spec.source is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"tenant {tenant!r} has no pipeline on this device")
        if "grpc" not in spec.results:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {tenant!r} sends its results to {', '.join(sorted(spec.results))}, not gRPC",
            )
        wanted = set(request.output_names)
        q = self.hub.subscribe(tenant)
        log.info("results stream opened tenant=%s", tenant)
        try:
            while context.is_active():
                try:
                    result = q.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    continue
                if result is None:
                    return
                if wanted:
                    for name in [n for n in result.outputs if n not in wanted]:
                        del result.outputs[name]
                yield result
        finally:
            self.hub.unsubscribe(tenant, q)
            log.info("results stream closed tenant=%s", tenant)


def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")


def serve(
    socket_path: Path,
    api: InferenceApi,
    workers: int = 8,
    results: ResultsApi | None = None,
    socket_mode: int = 0o660,
    socket_group: str = "",
) -> grpc.Server:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(socket_path.lstat().st_mode):
            socket_path.unlink()  # left over by a previous run that was killed
    except FileNotFoundError:
        pass
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(api, server)
    if results is not None:
        inference_pb2_grpc.add_TenantResultsServicer_to_server(results, server)
    # Created under a tight umask, so the socket is never reachable wider than its mode.
    old_umask = os.umask(0o777 & ~socket_mode)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, socket_mode)
    if socket_group:
        try:
            os.chown(socket_path, -1, grp.getgrnam(socket_group).gr_gid)
        except (KeyError, PermissionError) as exc:
            server.stop(None)
            raise ConfigError(
                f"cannot give the socket to group {socket_group!r} (the agent must be a member): {exc}"
            ) from None
    return server
