"""A local app's inference call, whichever way it came: gRPC or the shared-memory fast path.

Both transports let the same callers in (:class:`TenantAccess`: the tenant token, checked
against the tenants declared now) and run a call the same way (:class:`LocalInference`):
the tenant's serving model, with the constants and initial states the caller left out
filled in from the version's signature, run as one of the tenant's jobs on the fair
scheduler, recorded in :class:`agent.telemetry.Inferences`, then offered to the drift
sketches, data capture and the tenant's shadow candidate. A transport decodes its tensors,
calls :meth:`LocalInference.infer` and turns the typed errors into its own status with
:func:`status_of`. No gRPC here: the fast path serves without it.

Who may call: a tenant's token names it; a call naming another tenant, a shadow
candidate, or a tenant that has a token without giving one is refused. A tenant declared
without a token (such as ``default``) is open to anyone who can reach the socket
unless ``require_token`` is set; the socket's mode and group keep other users out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgefleet_proto.tenancy import DEFAULT_TENANT

from agent.errors import (
    AgentError,
    InferenceError,
    InvalidInput,
    NotReady,
    Overloaded,
    PermissionDenied,
    RegionRefused,
    TensorCodecError,
    Unauthenticated,
    UnknownTenant,
)
from agent.observe import Observer
from agent.pool import ModelPool, ServingModel
from agent.telemetry import Inference, Inferences, Origin
from agent.tenants import TenantSpec, is_shadow, shadow_of

log = logging.getLogger(__name__)

# Longest a call waits for its inference when the caller set no deadline.
DEFAULT_CALL_TIMEOUT_S = 30.0

# The status each refusal becomes, by gRPC's names (the fast path sends the same names).
_STATUS: tuple[tuple[type[AgentError], str], ...] = (
    (Unauthenticated, "UNAUTHENTICATED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (UnknownTenant, "NOT_FOUND"),
    (NotReady, "FAILED_PRECONDITION"),
    (RegionRefused, "INVALID_ARGUMENT"),
    (TensorCodecError, "INVALID_ARGUMENT"),
    (InvalidInput, "INVALID_ARGUMENT"),
    (Overloaded, "RESOURCE_EXHAUSTED"),
)


def status_of(exc: BaseException) -> str:
    """The status name of a refused or failed call; INTERNAL for anything else."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return "INTERNAL"


class TenantAccess:
    """Which tenant a caller may act for, from its token and the tenants declared now."""

    def __init__(self, specs: Callable[[], dict[str, TenantSpec]], require_token: bool = False) -> None:
        self.specs = specs
        self.require_token = require_token

    def tenant_of(self, token: str | None) -> str | None:
        """The tenant ``token`` belongs to; None without a token; Unauthenticated for a bad one."""
        return _tenant_of(self.specs(), token)

    def check(self, token: str | None, tenant: str, where: str = "") -> None:
        """Raise unless a caller holding ``token`` (or none) may use ``tenant``'s model;
        ``where`` tells a caller without a token where its transport wants one."""
        if is_shadow(tenant):
            raise PermissionDenied(f"{tenant!r} is a shadow candidate; it is not served")
        specs = self.specs()
        caller = _tenant_of(specs, token)
        if caller is not None and caller != tenant:
            log.warning("call refused caller=%s tenant=%s reason=foreign-tenant", caller, tenant)
            raise PermissionDenied(f"the token of tenant {caller!r} cannot use tenant {tenant!r}")
        if caller is None and self._needs_token(specs, tenant):
            raise Unauthenticated(f"tenant {tenant!r} needs its token{where}")

    def visible(self, token: str | None, tenant: str) -> bool:
        if is_shadow(tenant):
            return False
        specs = self.specs()
        caller = _tenant_of(specs, token)
        if caller is not None:
            return caller == tenant
        return not self._needs_token(specs, tenant)

    def _needs_token(self, specs: dict[str, TenantSpec], tenant: str) -> bool:
        spec = specs.get(tenant)
        return self.require_token or (spec is not None and bool(spec.token_sha256))


def _tenant_of(specs: dict[str, TenantSpec], token: str | None) -> str | None:
    if token is None:
        return None
    for spec in specs.values():
        if spec.accepts(token):
            return spec.id
    raise Unauthenticated("the token matches no tenant on this device")


# (tenant, work, timeout s) -> what work returned: where a call's inference runs.
RunOn = Callable[[str, Callable[[], Any], float], Any]
# (tenant, live model, inputs, live outputs, live run ms): hands a call to the shadow comparison.
OfferShadow = Callable[[str, ServingModel, dict[str, np.ndarray], dict[str, np.ndarray], float], None]


def run_inline(tenant: str, work: Callable[[], Any], timeout: float) -> Any:
    return work()


@dataclass(frozen=True)
class Answer:
    serving: ServingModel
    outputs: dict[str, np.ndarray]
    # From the call's start (its tensors decoded) to its outputs ready.
    latency_ms: float


class LocalInference:
    def __init__(
        self,
        pool: ModelPool,
        inferences: Inferences,
        run: RunOn | None = None,
        observer: Observer | None = None,
        shadow: OfferShadow | None = None,
    ) -> None:
        self.pool = pool
        # Each call counts for its model version and its tenant, like a pipeline's inference.
        self.inferences = inferences
        # The fair scheduler in the service (a call runs on its caller's thread when a share
        # is free); inline without one.
        self.run: RunOn = run or run_inline
        # A caller's inferences feed the drift sketches and data capture like a pipeline's.
        self.observer = observer
        # Where a call goes to be compared with the tenant's shadow candidate, if it has one.
        self.shadow = shadow

    def serving(self, tenant: str) -> ServingModel:
        serving = self.pool.get(tenant or DEFAULT_TENANT)
        if serving is None:
            if self.pool.is_expected(tenant):
                raise NotReady(f"tenant {tenant!r} has no model loaded yet")
            raise UnknownTenant(f"unknown tenant {tenant!r}")
        return serving

    def infer(
        self,
        tenant: str,
        serving: ServingModel,
        decode: Callable[[], dict[str, np.ndarray]],
        output_names: list[str],
        timeout: float | None = None,
        lent: bool = False,
    ) -> Answer:
        """Run one call; every outcome is recorded, failures raised as typed errors.

        ``decode`` gives the caller's tensors in a dict of the call's own (kept, not copied); it
        runs inside, so a malformed tensor counts as a failed call of the model version, as the
        runtime's refusal of a tensor does.
        ``lent``: the tensors are views of the caller's memory, which it may change once the
        call returns; whatever keeps them for later (capture, the shadow lane) gets copies.
        """
        start = time.perf_counter()
        limit = min(timeout or DEFAULT_CALL_TIMEOUT_S, DEFAULT_CALL_TIMEOUT_S)
        error: AgentError | None = None
        inputs: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        live_ms = 0.0
        try:
            inputs = decode()
            if serving.signature is not None and serving.fills_inputs:
                # Constants and initial states the caller left out, as a tenant pipeline feeds
                # them. No state is kept between calls (a call names no stream): a caller that
                # streams sends each answer's state output back as the next call's state.
                inputs = serving.signature.completed(inputs, serving.model.inputs)

            def live() -> tuple[dict[str, np.ndarray], float]:
                begin = time.perf_counter()
                out = serving.model.run(inputs, output_names)
                return out, (time.perf_counter() - begin) * 1000.0

            outputs, live_ms = self.run(tenant, live, limit)
        except (TensorCodecError, InferenceError) as exc:
            error = exc
        except Exception as exc:
            log.exception("inference crashed tenant=%s model=%s", tenant, serving.model_name)
            error = InferenceError(f"inference failed: {exc}")
        latency_ms = (time.perf_counter() - start) * 1000.0
        self.inferences.record(
            Inference(
                tenant, serving.model_name, serving.model_version, Origin.GRPC, latency_ms, error is None
            )
        )
        if error is not None:
            log.info(
                "inference refused tenant=%s model=%s version=%s code=%s error=%s",
                tenant,
                serving.model_name,
                serving.model_version,
                status_of(error),
                error,
            )
            raise error
        self._observe(tenant, serving, inputs, outputs, lent)
        self._offer_shadow(tenant, serving, inputs, outputs, live_ms, lent)
        return Answer(serving, outputs, latency_ms)

    def _observe(
        self,
        tenant: str,
        serving: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        lent: bool,
    ) -> None:
        """Sketch the input the version's signature says a source feeds, in its layout; without
        a signature, the model's first input, whose layout the drift spec tells."""
        observer = self.observer
        model, version = serving.model_name, serving.model_version
        # The observer keeps the arrays for a while: lent ones are copied, and only when it looks.
        if observer is None or not (
            observer.sketcher.wants(tenant, model, version) or observer.captures.wants(tenant, model)
        ):
            return
        source = serving.signature.source() if serving.signature is not None else None
        name = source.name if source is not None else ""
        if name not in inputs:
            name, source = (serving.model.inputs[0].name if serving.model.inputs else ""), None
        if name in inputs:
            layout = source.layout if source is not None else ""
            array = inputs[name].copy() if lent else inputs[name]
            scores = serving.signature.scores() if serving.signature is not None else ""
            observer.observe(tenant, model, version, array, outputs, layout=layout, scores=scores)

    def _offer_shadow(
        self,
        tenant: str,
        serving: ServingModel,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        live_ms: float,
        lent: bool,
    ) -> None:
        if self.shadow is None:
            return
        if lent:
            if self.pool.get(shadow_of(tenant)) is None:
                return
            # The comparison runs later, when the caller may have reused its memory.
            inputs = {name: array.copy() for name, array in inputs.items()}
        try:
            self.shadow(tenant, serving, inputs, outputs, live_ms)
        except Exception:
            # The answer is ready and must reach the caller whatever the comparison does.
            log.exception("shadow offer failed tenant=%s model=%s", tenant, serving.model_name)
