"""The shared-memory fast path on a real agent: apps on the device put tensors in regions they
share with the agent, and the socket carries only where they lie.

Two tenants with tokens serve one real model. A call through the fast path answers what
onnxruntime run directly answers; a tenant reaches only its own regions, whatever it names;
a slot outside what the tenant registered is refused with a reason before the model runs,
and neither region is written; hostile packets and descriptors get an error, not a crash.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from edgefleet_proto import inference_pb2

from agent.client import FastPathError, Region, SharedMemoryClient
from agent.shm_wire import fast_path_socket, receive, send
from agent.tensors import from_arrays, to_numpy
from tests.support.agent_peer import Peer
from tests.support.agent_process import AgentProcess
from tests.support.models import small_conv

ort = pytest.importorskip("onnxruntime")

TOKENS = {t: f"{t}-token-{'s' * 16}" for t in ("cam", "mic")}
SENTINEL = 0xAB
IMAGE = (2, 3, 32, 32)


class Fleet:
    def __init__(self, agent: AgentProcess, model: Path) -> None:
        self.agent = agent
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def client(self, tenant: str, token: str | None = None) -> SharedMemoryClient:
        return SharedMemoryClient(self.agent.socket, tenant=tenant, token=token or TOKENS[tenant])

    def direct(self, image: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self.session.run(None, {"image": np.array(image)})[0]
        return logits


@pytest.fixture
def fleet(
    make_agent: Callable[..., AgentProcess], make_peer: Callable[[str], Peer], tmp_path: Path
) -> Iterator[Fleet]:
    agent = make_agent()
    with agent.config.open("a") as f:
        for tenant, token in TOKENS.items():
            f.write(f'\n[[tenants]]\nid = "{tenant}"\ntoken = "{token}"\n')
    model = small_conv(tmp_path / "conv.onnx")
    peer = make_peer(agent.device_id)
    digest = peer.add_artifact(model)
    peer.publish_desired(1, *(peer.assignment(digest, "1", name="conv", tenant=t) for t in TOKENS))
    agent.start()
    agent.wait_ready()
    for tenant in TOKENS:
        peer.wait_active(digest, tenant=tenant)
    yield Fleet(agent, model)
    assert agent.terminate() == 0, agent.output()


def filled(region: Region, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image written into ``region`` and a slot for its logits, filled with the sentinel."""
    image = region.array(IMAGE, np.float32)
    image[...] = np.random.default_rng(seed).standard_normal(IMAGE)
    logits = region.array((IMAGE[0], 10), np.float32)
    logits.view(np.uint8)[...] = SENTINEL
    return image, logits


def test_a_call_through_shared_memory_answers_what_onnxruntime_answers(fleet: Fleet) -> None:
    with fleet.client("cam") as client:
        region = client.region("frames", 1 << 16)
        image, logits = filled(region, 1)
        result = client.infer({"image": image}, {"logits": logits})
        assert (result.model_name, result.model_version) == ("conv", "1")
        # Written in place: the result views the array the app gave for the output.
        assert result.outputs["logits"] is logits
        np.testing.assert_allclose(logits, fleet.direct(image), rtol=1e-5, atol=1e-5)
        # The same tenant over gRPC gets the same answer.
        reply = fleet.agent.stub().Infer(
            inference_pb2.InferRequest(tenant="cam", inputs=from_arrays({"image": np.array(image)})),
            metadata=[("x-edgefleet-token", TOKENS["cam"])],
            timeout=10,
        )
        np.testing.assert_array_equal(to_numpy(reply.outputs["logits"]), logits)
        # One image of the batch: the output slot keeps its room, the result is shaped as answered.
        small = client.infer({"image": image[:1]}, {"logits": logits})
        assert small.outputs["logits"].shape == (1, 10)
        # The region is this process's memfd, mode 0600; the socket is the gRPC socket's mode.
        assert stat.S_IMODE(os.fstat(region.fileno()).st_mode) == 0o600
        shm = fast_path_socket(fleet.agent.socket)
        assert stat.S_IMODE(shm.stat().st_mode) == stat.S_IMODE(fleet.agent.socket.stat().st_mode) == 0o660


def test_a_tenant_cannot_read_or_write_another_tenants_region(fleet: Fleet) -> None:
    cam, mic = fleet.client("cam"), fleet.client("mic")
    try:
        secret = cam.region("frames", 1 << 16)
        cam_image, cam_logits = filled(secret, 1)
        before = bytes(secret.array((secret.size,), np.uint8, offset=0))
        # mic names cam's region, by the same name cam gave it: mic has no such region.
        forged = inference_pb2.SharedMemoryInfer(
            inputs=[slot("image", "frames", 0, cam_image)], outputs=[slot("logits", "frames", 0, cam_logits)]
        )
        with pytest.raises(FastPathError, match="tenant 'mic' has no region 'frames'") as refused:
            mic._call(inference_pb2.SharedMemoryRequest(infer=forged))
        assert refused.value.code == "INVALID_ARGUMENT"
        # mic's own region of that name is its own memory: the answer is of mic's image.
        own = mic.region("frames", 1 << 16)
        mic_image, mic_logits = filled(own, 2)
        mic.infer({"image": mic_image}, {"logits": mic_logits})
        np.testing.assert_allclose(mic_logits, fleet.direct(mic_image), rtol=1e-5, atol=1e-5)
        assert bytes(secret.array((secret.size,), np.uint8, offset=0)) == before
        # Unregistering is per tenant too.
        with pytest.raises(FastPathError, match="tenant 'mic' has no region 'other'"):
            mic._call(
                inference_pb2.SharedMemoryRequest(
                    unregister=inference_pb2.SharedMemoryUnregister(name="other")
                )
            )
        cam.infer({"image": cam_image}, {"logits": cam_logits})
        np.testing.assert_allclose(cam_logits, fleet.direct(cam_image), rtol=1e-5, atol=1e-5)
    finally:
        cam.close()
        mic.close()
    # Opening as another tenant: the tokens decide, as on gRPC.
    for tenant, token, code in [
        ("cam", TOKENS["mic"], "PERMISSION_DENIED"),
        ("cam", "not-a-token-of-anyone", "UNAUTHENTICATED"),
        ("cam.shadow", TOKENS["cam"], "PERMISSION_DENIED"),
    ]:
        with pytest.raises(FastPathError) as denied:
            fleet.client(tenant, token)
        assert denied.value.code == code, (tenant, token, denied.value)
    with pytest.raises(FastPathError, match="needs its token") as missing:
        SharedMemoryClient(fleet.agent.socket, tenant="cam")
    assert missing.value.code == "UNAUTHENTICATED"


def slot(name: str, region: str, offset: int, array: np.ndarray) -> inference_pb2.SharedMemorySlot:
    return inference_pb2.SharedMemorySlot(
        name=name, region=region, offset=offset, byte_size=array.nbytes, dtype="float32", shape=array.shape
    )


INPUT_BYTES = int(np.prod(IMAGE)) * 4


def bad_calls(size: int) -> list[tuple[str, dict[str, object], dict[str, object], str]]:
    """(case, input slot changes, output slot changes, the reason the agent gives)."""
    return [
        ("unknown region", {"region": "nowhere"}, {}, "tenant 'cam' has no region 'nowhere'"),
        ("offset past the end", {"offset": size}, {}, f"lie outside region 'frames' of {size} bytes"),
        ("one byte too far", {"offset": size - INPUT_BYTES + 1}, {}, "lie outside region 'frames'"),
        ("offset near 2**64", {"offset": 2**64 - 8}, {}, "lie outside region 'frames'"),
        ("size that is not the shape's", {"byte_size": 4}, {}, "the slot says 4"),
        ("unaligned offset", {"offset": 2}, {}, "offset 2 is not a multiple of 4"),
        ("unknown dtype", {"dtype": "float128"}, {}, "unknown dtype 'float128'"),
        ("output outside", {}, {"offset": size - 8}, "output 'logits': bytes"),
        ("output in another's region", {}, {"region": "theirs"}, "tenant 'cam' has no region 'theirs'"),
        (
            "output slot too small for the answer",
            {},
            {"byte_size": 40},
            "its slot holds 40; nothing was written",
        ),
        ("unknown output", {}, {"name": "scores"}, "unknown output 'scores'"),
    ]


def test_a_slot_outside_what_the_tenant_registered_is_refused_and_touches_nothing(fleet: Fleet) -> None:
    with fleet.client("cam") as client, fleet.client("mic") as mic:
        mic.region("theirs", 1 << 16)
        region = client.region("frames", 1 << 16)
        image, logits = filled(region, 3)
        before = bytes(region.array((region.size,), np.uint8, offset=0))
        for case, inputs, outputs, reason in bad_calls(region.size):
            call = inference_pb2.SharedMemoryInfer(
                inputs=[slot("image", "frames", 0, image)],
                outputs=[slot("logits", "frames", region.offset_of(logits) or 0, logits)],
            )
            for field, value in inputs.items():
                setattr(call.inputs[0], field, value)
            for field, value in outputs.items():
                setattr(call.outputs[0], field, value)
            with pytest.raises(FastPathError) as refused:
                client._call(inference_pb2.SharedMemoryRequest(infer=call))
            assert refused.value.code == "INVALID_ARGUMENT", case
            assert reason in refused.value.message, (case, refused.value.message)
            assert bytes(region.array((region.size,), np.uint8, offset=0)) == before, case
        # The connection and the agent carry on.
        client.infer({"image": image}, {"logits": logits})
        np.testing.assert_allclose(logits, fleet.direct(image), rtol=1e-5, atol=1e-5)


def raw_request(
    sock: socket.socket, payload: bytes, fds: list[int] | None = None
) -> inference_pb2.SharedMemoryResponse:
    send(sock, payload, fds or [])
    answer, extra = receive(sock, bytearray(1 << 16))
    assert not extra
    return inference_pb2.SharedMemoryResponse.FromString(answer)


def test_hostile_packets_and_descriptors_are_refused_and_the_agent_serves_on(fleet: Fleet) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(str(fast_path_socket(fleet.agent.socket)))
    with sock:
        garbage = raw_request(sock, b"\xff\xfe not protobuf \x00" * 10)
        assert garbage.error.code == "INVALID_ARGUMENT"
        infer = inference_pb2.SharedMemoryRequest(infer=inference_pb2.SharedMemoryInfer())
        early = raw_request(sock, infer.SerializeToString())
        assert (early.error.code, early.error.message) == (
            "UNAUTHENTICATED",
            "open the connection first (SharedMemoryOpen: the tenant and its token)",
        )
        opened = raw_request(
            sock,
            inference_pb2.SharedMemoryRequest(
                open=inference_pb2.SharedMemoryOpen(tenant="cam", token=TOKENS["cam"])
            ).SerializeToString(),
        )
        assert opened.ok.tenant == "cam"

        def register(name: str, fds: list[int], size: int = 4096) -> inference_pb2.SharedMemoryError:
            request = inference_pb2.SharedMemoryRequest(
                register=inference_pb2.SharedMemoryRegister(name=name, byte_size=size)
            )
            return raw_request(sock, request.SerializeToString(), fds).error

        assert "carries the region's descriptor, got 0" in register("none", []).message
        # A plain file could shrink under the agent's mapping (SIGBUS): only sealed memfds.
        with tempfile.TemporaryFile() as plain:
            plain.truncate(4096)
            assert "is not a memfd" in register("file", [plain.fileno()]).message
        unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        sealed_small = os.memfd_create("small", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(unsealed, 4096)
            assert "not sealed against shrinking" in register("unsealed", [unsealed]).message
            os.ftruncate(sealed_small, 1024)
            fcntl.fcntl(sealed_small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            assert "holds 1024 bytes, 4096 were registered" in register("small", [sealed_small]).message
            assert "invalid region name" in register("../etc", [sealed_small], 1024).message
            assert "byte_size must be" in register("huge", [sealed_small], 1 << 40).message
            assert (
                "only a register request"
                in raw_request(sock, infer.SerializeToString(), [unsealed]).error.message
            )
        finally:
            os.close(unsealed)
            os.close(sealed_small)
    # The agent still serves, both ways.
    with fleet.client("cam") as client:
        region = client.region("frames", 1 << 16)
        image, logits = filled(region, 4)
        client.infer({"image": image}, {"logits": logits})
        np.testing.assert_allclose(logits, fleet.direct(image), rtol=1e-5, atol=1e-5)
    assert fleet.agent.proc is not None and fleet.agent.proc.poll() is None
