"""The app's side of the shared-memory fast path (:mod:`agent.shared_memory` is the agent's).

For apps on the device that call a model often with large tensors: the tensors stay in
regions of memory the app and the agent both map, and each call sends only where they lie::

    import numpy as np
    from agent.client import SharedMemoryClient

    with SharedMemoryClient("/var/lib/edgefleet/inference.sock", tenant="cam", token=TOKEN) as client:
        region = client.region("frames", 1 << 20)
        image = region.array((1, 3, 224, 224), np.float32)
        scores = region.array((1, 1000), np.float32)
        image[...] = frame                      # written straight into the shared region
        result = client.infer({"input": image}, {"logits": scores})
        top = int(result.outputs["logits"].argmax())   # the agent wrote into ``scores``

A region is an anonymous memfd of this process, mode 0600, sealed so it cannot shrink, and
passed to the agent once by descriptor; no other process can open it. Every array given to
:meth:`SharedMemoryClient.infer` must be a C-contiguous array inside one of the client's
regions (:meth:`Region.array` makes such arrays). Errors come back as :class:`FastPathError`
with gRPC's status names. One client is one connection: use one per thread that calls.

Imports numpy, the contract and the standard library only: no gRPC, no runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt
from edgefleet_proto import inference_pb2

from agent.shm_wire import MAX_PACKET, fast_path_socket, receive, send
from agent.tensors import dtype_name

# Where Region.array places each new array: cache-line aligned, which every dtype's alignment divides.
ALIGNMENT = 64


class FastPathError(Exception):
    """The agent refused a request; ``code`` is a gRPC status name (INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Region:
    """A block of shared memory registered with the agent under ``name``."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self._memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._bytes = np.frombuffer(self._memory, np.uint8)
        self.address = int(self._bytes.ctypes.data)
        self._next = 0
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def array(self, shape: tuple[int, ...], dtype: npt.DTypeLike, offset: int | None = None) -> np.ndarray:
        """A C-order array in the region: at ``offset``, or after the last one this made."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        start = self._next if offset is None else offset
        if offset is None:
            start = -(-start // ALIGNMENT) * ALIGNMENT
        if start < 0 or start + nbytes > self.size:
            raise ValueError(f"region {self.name!r} of {self.size} bytes has no room for {nbytes} at {start}")
        self._next = max(self._next, start + nbytes)
        return self._bytes[start : start + nbytes].view(dt).reshape(shape)

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array`` starts in the region, if it lies wholly inside it."""
        start = int(array.__array_interface__["data"][0]) - self.address
        return start if start >= 0 and start + array.nbytes <= self.size else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        del self._bytes
        # Arrays of the app may still view it: then it is unmapped with the last of them.
        with contextlib.suppress(BufferError):
            self._memory.close()
        os.close(self._fd)


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    # Views of the output slots, shaped as the model answered.
    outputs: dict[str, np.ndarray]
    # The agent's time for the call, from its slots checked to its outputs ready.
    latency_ms: float


class SharedMemoryClient:
    def __init__(
        self, socket_path: str | Path, tenant: str = "", token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        """Connect to the agent's fast path. ``socket_path`` is the agent's socket (its ``socket``
        setting) or the fast path's own, that path plus ``.shm``."""
        path = Path(socket_path)
        if not path.name.endswith(".shm"):
            path = fast_path_socket(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout_s)
        self._buffer = bytearray(MAX_PACKET)
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}
        try:
            self._sock.connect(str(path))
            opened = self._call(
                inference_pb2.SharedMemoryRequest(
                    open=inference_pb2.SharedMemoryOpen(tenant=tenant, token=token or "")
                )
            )
        except BaseException:
            self._sock.close()
            raise
        self.tenant = opened.ok.tenant

    def region(self, name: str, size: int) -> Region:
        """A new region of ``size`` bytes, registered with the agent as ``name``."""
        fd = os.memfd_create(f"edgefleet-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            # The agent maps it for as long as it is registered: it must never shrink.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            region = Region(name, fd, size)
        except BaseException:
            os.close(fd)
            raise
        try:
            self._call(
                inference_pb2.SharedMemoryRequest(
                    register=inference_pb2.SharedMemoryRegister(name=name, byte_size=size)
                ),
                fds=[fd],
            )
        except BaseException:
            region.close()
            raise
        self._regions[name] = region
        return region

    def release(self, region: Region) -> None:
        """Unregister the region and unmap it here."""
        self._regions.pop(region.name, None)
        try:
            self._call(
                inference_pb2.SharedMemoryRequest(
                    unregister=inference_pb2.SharedMemoryUnregister(name=region.name)
                )
            )
        finally:
            region.close()

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], timeout_s: float = 0.0
    ) -> InferResult:
        """Run the tenant's model on ``inputs``, writing each output into the array named for it.

        Every array must lie in one of this client's regions; an output's array gives the room
        for it (its bytes), and the result views the bytes the agent wrote, as shaped.
        """
        call = inference_pb2.SharedMemoryInfer(timeout_ms=int(timeout_s * 1000))
        for name, array in inputs.items():
            region, offset = self._locate(name, array)
            call.inputs.add(
                name=name,
                region=region.name,
                offset=offset,
                byte_size=array.nbytes,
                dtype=dtype_name(array.dtype) or str(array.dtype),
                shape=array.shape,
            )
        slots: dict[str, tuple[Region, int]] = {}
        for name, array in outputs.items():
            region, offset = self._locate(name, array)
            slots[name] = (region, offset)
            call.outputs.add(name=name, region=region.name, offset=offset, byte_size=array.nbytes)
        result = self._call(inference_pb2.SharedMemoryRequest(infer=call)).result
        views: dict[str, np.ndarray] = {}
        for out in result.outputs:
            region, offset = slots[out.name]
            given = outputs[out.name]
            shape = tuple(out.shape)
            if given.shape == shape and dtype_name(given.dtype) == out.dtype:
                views[out.name] = given
            else:
                views[out.name] = region.array(shape, out.dtype, offset=offset)
        return InferResult(result.model_name, result.model_version, views, result.latency_ms)

    def _locate(self, name: str, array: np.ndarray) -> tuple[Region, int]:
        if not array.flags.c_contiguous:
            raise ValueError(f"{name!r}: the array must be C-contiguous (Region.array makes such arrays)")
        for region in self._regions.values():
            offset = region.offset_of(array)
            if offset is not None:
                return region, offset
        raise ValueError(
            f"{name!r}: the array lies in none of this client's regions (make it with Region.array)"
        )

    def _call(
        self, request: inference_pb2.SharedMemoryRequest, fds: list[int] | None = None
    ) -> inference_pb2.SharedMemoryResponse:
        with self._lock:
            try:
                send(self._sock, request.SerializeToString(), fds or ())
                payload, extra = receive(self._sock, self._buffer)
            except TimeoutError:
                # An answer may still come: the connection can no longer pair requests and answers.
                self._sock.close()
                raise
        for fd in extra:
            os.close(fd)
        if not payload:
            raise ConnectionError("the agent closed the fast path connection")
        response = inference_pb2.SharedMemoryResponse.FromString(payload)
        if response.WhichOneof("kind") == "error":
            raise FastPathError(response.error.code, response.error.message)
        return response

    def close(self) -> None:
        """Close the connection (the agent forgets its regions) and unmap them here."""
        self._sock.close()
        for region in self._regions.values():
            region.close()
        self._regions.clear()

    def __enter__(self) -> SharedMemoryClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
