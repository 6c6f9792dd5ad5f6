"""The local inference API: gRPC InferenceService and TenantResults on a Unix socket.

Handlers are thin: check the caller's tenant token (:class:`TenantAuth`, over
:class:`agent.local_calls.TenantAccess`), decode tensors (:mod:`agent.tensors`, views of
the request's bytes, no copy) and hand the call to :class:`agent.local_calls.LocalInference`,
which the shared-memory fast path (:mod:`agent.shared_memory`) uses too: the tenant's model,
its signature's constants and initial states, the fair scheduler (on the handler's own
thread when a share is free), the inference record, drift sketches, capture and the shadow
lane. Every failure becomes a gRPC status with a message; nothing a caller sends can crash
the agent.

Who may call: the socket's mode (``[api] socket_mode``, 0660 by default) and
group (``[api] socket_group``) keep out users outside that group; within it, the token in the
``x-edgefleet-token`` metadata names the tenant, and a tenant can only use its
own model and results. A tenant declared without a token (such as
``default``) is open to anyone who can reach the socket unless
``[api] require_token`` is set. Shadow candidates are never served, but a
tenant's calls are offered to its shadow candidate (``shadow``, in the service
:meth:`agent.pipeline.Pipelines.offer_shadow`) once the live answer is ready.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import queue
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from edgefleet_proto import inference_pb2, inference_pb2_grpc
from edgefleet_proto.tenancy import DEFAULT_TENANT

from agent.errors import AgentError, CallRefused, ConfigError
from agent.local_calls import LocalInference, OfferShadow, RunOn, TenantAccess, status_of
from agent.observe import Observer
from agent.pipeline import ResultHub
from agent.pool import ModelPool, ServingModel
from agent.runtime import TensorSpec
from agent.telemetry import Inferences
from agent.tenants import TenantSpec, is_shadow
from agent.tensors import fill_all, to_arrays

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TOKEN_METADATA = "x-edgefleet-token"
# How often a StreamResults call checks that its caller is still there.
STREAM_POLL_S = 0.5


class TenantAuth:
    """Which tenant a gRPC call may act for: :class:`TenantAccess` with the token from the metadata."""

    def __init__(self, specs: Callable[[], dict[str, TenantSpec]], require_token: bool = False) -> None:
        self.access = TenantAccess(specs, require_token)

    @property
    def specs(self) -> Callable[[], dict[str, TenantSpec]]:
        return self.access.specs

    @property
    def require_token(self) -> bool:
        return self.access.require_token

    def caller(self, context: Any) -> str | None:
        """The tenant whose token the call carries; None without a token; aborts on a bad one."""
        try:
            return self.access.tenant_of(_token(context))
        except CallRefused as exc:
            _refuse(context, exc)

    def check(self, context: Any, tenant: str) -> None:
        """Abort unless the caller may use ``tenant``'s model and results."""
        try:
            self.access.check(_token(context), tenant, f" in the {TOKEN_METADATA!r} metadata")
        except CallRefused as exc:
            _refuse(context, exc)

    def visible(self, context: Any, tenant: str) -> bool:
        try:
            return self.access.visible(_token(context), tenant)
        except CallRefused as exc:
            _refuse(context, exc)


def _token(context: Any) -> str | None:
    token = next((v for k, v in context.invocation_metadata() or () if k == TOKEN_METADATA), None)
    return None if token is None else str(token)


def _refuse(context: Any, exc: AgentError) -> NoReturn:
    _abort(context, grpc.StatusCode[status_of(exc)], str(exc))


def _specs(specs: list[TensorSpec]) -> list[inference_pb2.TensorSpec]:
    return [inference_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in specs]


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
        self.broker_connected = broker_connected
        self.auth = auth or TenantAuth(dict)
        # What a call does once its caller is let in, shared with the shared-memory fast path.
        self.calls = LocalInference(pool, inferences, run, observer, shadow)

    def Infer(self, request: inference_pb2.InferRequest, context: Any) -> inference_pb2.InferResponse:
        tenant = request.tenant or DEFAULT_TENANT
        self.auth.check(context, tenant)
        try:
            serving = self.calls.serving(tenant)
            answer = self.calls.infer(
                tenant,
                serving,
                # Read-only views of the request's bytes: the runtimes only read their inputs.
                lambda: to_arrays(request.inputs, "input", writable=False),
                list(request.output_names),
                context.time_remaining(),
            )
            response = inference_pb2.InferResponse(
                model_name=serving.model_name,
                model_version=serving.model_version,
                latency_ms=answer.latency_ms,
            )
            fill_all(response.outputs, answer.outputs, "output")
        except AgentError as exc:
            _abort(context, grpc.StatusCode[status_of(exc)], str(exc))
        return response

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


# The longest path a Unix socket can be bound at (sun_path less its terminating NUL).
MAX_SOCKET_PATH = 107


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
    # Bound beside its path and moved there once it listens with its mode and group: the socket
    # file appears only when a connection is answered, so an app that connects the moment it
    # exists is never refused. A path too long for the sibling's one more byte is bound in place.
    starting = socket_path.with_name(f".{socket_path.name}")
    bound = starting if len(os.fsencode(starting)) <= MAX_SOCKET_PATH else socket_path
    with contextlib.suppress(FileNotFoundError):
        bound.unlink()
    # Created under a tight umask, so the socket is never reachable wider than its mode.
    old_umask = os.umask(0o777 & ~socket_mode)
    try:
        server.add_insecure_port(f"unix:{bound}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(bound, socket_mode)
    if socket_group:
        try:
            os.chown(bound, -1, grp.getgrnam(socket_group).gr_gid)
        except (KeyError, PermissionError) as exc:
            server.stop(None)
            raise ConfigError(
                f"cannot give the socket to group {socket_group!r} (the agent must be a member): {exc}"
            ) from None
    if bound != socket_path:
        os.replace(bound, socket_path)
    return server
