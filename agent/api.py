"""The local inference API: gRPC InferenceService on a Unix socket.

Handlers are thin: decode tensors (:mod:`agent.tensors`), find the tenant's
model in the pool, run it, record latency and errors for telemetry. Every
failure becomes a gRPC status with a message; nothing a caller sends can crash
the agent.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.errors import InferenceError, InvalidInput, TensorCodecError
from agent.pool import ModelPool
from agent.runtime import TensorSpec
from agent.telemetry import InferenceStats
from agent.tensors import from_numpy, to_numpy

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TENANT = "default"


def _specs(specs: list[TensorSpec]) -> list[inference_pb2.TensorSpec]:
    return [inference_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in specs]


class InferenceApi(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pool: ModelPool, stats: InferenceStats, broker_connected: Callable[[], bool]) -> None:
        self.pool = pool
        self.stats = stats
        self.broker_connected = broker_connected

    def Infer(self, request: inference_pb2.InferRequest, context: Any) -> inference_pb2.InferResponse:
        tenant = request.tenant or DEFAULT_TENANT
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
            outputs = serving.model.run(inputs, list(request.output_names))
            latency_ms = (time.perf_counter() - start) * 1000.0
            response = inference_pb2.InferResponse(
                model_name=serving.model_name,
                model_version=serving.model_version,
                latency_ms=latency_ms,
            )
            for name, array in outputs.items():
                response.outputs[name].CopyFrom(from_numpy(array, f"output {name!r}"))
        except (TensorCodecError, InvalidInput) as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except InferenceError as exc:
            code, message = grpc.StatusCode.INTERNAL, str(exc)
        except Exception as exc:
            log.exception("inference crashed tenant=%s model=%s", tenant, serving.model_name)
            code, message = grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
        ok = code == grpc.StatusCode.OK
        elapsed = (time.perf_counter() - start) * 1000.0
        self.stats.record(tenant, serving.model_name, serving.model_version, elapsed, ok)
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
                for s in self.pool.all()
            ]
        )

    def Health(self, request: inference_pb2.HealthRequest, context: Any) -> inference_pb2.HealthResponse:
        loaded = len(self.pool.all())
        return inference_pb2.HealthResponse(
            status="serving" if loaded else "starting",
            broker_connected=self.broker_connected(),
            models_loaded=loaded,
        )


def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")


def serve(socket_path: Path, api: InferenceApi, workers: int = 8) -> grpc.Server:
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
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    os.chmod(socket_path, 0o660)
    return server
