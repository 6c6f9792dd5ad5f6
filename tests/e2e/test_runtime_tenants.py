"""A tenant pipeline end to end: the controller rolls a model (and a shadow candidate) out to a
tenant whose camera-like source runs on the agent; the tenant app streams its results."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from edgefleet_proto import inference_pb2, inference_pb2_grpc

from agent.tensors import from_arrays, to_numpy
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import small_conv
from tests.support.waiting import wait_until

TOKEN = "door-app-token-0123456789"
TENANT = f"""
[[tenants]]
id = "door"
model = "conv"
token = "{TOKEN}"
rate_hz = 20
[tenants.source]
kind = "synthetic"
shape = "32,32,3"
[tenants.preprocess]
scale = 0.00392156862745098
layout = "nchw"
"""


def rollout(controller: Controller, version: str, tenant: str, device: str) -> None:
    created = controller.cli(
        "rollouts", "create", "--model", "conv", "--version", version, "--device", device, "--tenant", tenant
    )  # fmt: skip
    final = wait_until(lambda: rollout_done(controller, created["id"]), 90, f"rollout {version} to {tenant}")
    assert final["status"] == "succeeded", final


def test_rolled_out_model_feeds_a_tenant_stream_and_a_shadow_stays_private(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    controller.cli(
        "models", "upload", str(small_conv(tmp_path / "v1.onnx", seed=1)), "--name", "conv", "--version", "1"
    )
    controller.cli(
        "models", "upload", str(small_conv(tmp_path / "v2.onnx", seed=2)), "--name", "conv", "--version", "2"
    )
    agent = register_agent(controller, tmp_path / "agents", "door-cam")
    with agent.config.open("a") as f:
        f.write(TENANT)
    agents.append(agent.start())
    rollout(controller, "1", "door", "door-cam")
    rollout(controller, "2", "door.shadow", "door-cam")

    metadata = [("x-edgefleet-token", TOKEN)]
    with agent.channel() as channel:
        stream = inference_pb2_grpc.TenantResultsStub(channel).StreamResults(
            inference_pb2.StreamResultsRequest(tenant="door"), metadata=metadata, timeout=30
        )
        results = [next(stream) for _ in range(5)]
        stream.cancel()
        assert {(r.tenant, r.model_name, r.model_version) for r in results} == {("door", "conv", "1")}
        assert [to_numpy(r.outputs["logits"]).shape for r in results] == [(1, 10)] * 5

        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        x = np.zeros((1, 3, 32, 32), np.float32)
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(
                inference_pb2.InferRequest(tenant="door.shadow", inputs=from_arrays({"image": x})),
                metadata=metadata,
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        assert [(m.tenant, m.model_version) for m in listed.models] == [("door", "1")]
