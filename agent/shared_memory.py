"""The shared-memory fast path: tensors stay in memory a co-located app and the agent both map.

gRPC in Python costs about half a millisecond a call before any tensor moves; an app on
the device that sends a 600 kB image several hundred times a second pays that and a copy
of the image each way. Here the app creates *regions* (anonymous memfds, sealed against
shrinking), registers each once by passing its descriptor over a SOCK_SEQPACKET Unix socket
beside the gRPC one (:func:`agent.shm_wire.fast_path_socket`), and each call then carries
only names, offsets and shapes. The agent runs the model on numpy views of the region and
writes each output into the slot the call names. :mod:`agent.client` is the app's side.

Access is the gRPC API's: the socket gets the same mode and group, and a connection opens
by naming its tenant and giving the tenant's token (:class:`agent.local_calls.TenantAccess`,
checked again on every request, so a token the controller withdraws stops working at once).
Regions are keyed by tenant: a call names regions of its own tenant only, so no tenant can
read or write another's. A region lives until it is unregistered or the connection that
registered it closes.

Bad input changes nothing: every slot of a call is checked against the region the tenant
registered (name, offset, size, alignment, dtype and shape) before any model runs, and an
output that turns out larger than its slot is refused before any output is written.

Why sealed memfds and not files in /dev/shm: a region is mapped for as long as it is
registered, and a process that shrinks a mapped file makes the next read of the lost pages
kill the reader with SIGBUS. A memfd sealed with F_SEAL_SHRINK cannot shrink, and the
agent checks the seal; a memfd also has no name another process could open.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import itertools
import logging
import math
import mmap
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgefleet_proto import inference_pb2
from edgefleet_proto.tenancy import DEFAULT_TENANT
from google.protobuf.message import DecodeError

from agent.errors import AgentError, ConfigError, InvalidInput, RegionRefused, Unauthenticated
from agent.local_calls import LocalInference, TenantAccess, status_of
from agent.pool import ServingModel
from agent.shm_wire import MAX_PACKET, REGION_NAME, PacketError, close_all, receive, send
from agent.tensors import DTYPES, MAX_RANK, dtype_name

log = logging.getLogger(__name__)

# Each connection is a thread; a local app needs one per thread that calls.
MAX_CONNECTIONS = 64
MAX_REGIONS_PER_TENANT = 64
# Regions map the app's memory, not the agent's, but they take the agent's address space
# (3 GB on a 32-bit Raspberry Pi OS).
MAX_REGION_BYTES = 1 << 30
WHERE_TOKEN = " (give it in SharedMemoryOpen.token)"


@dataclass(eq=False)
class Region:
    tenant: str
    name: str
    size: int
    memory: mmap.mmap
    # The connection that registered it: the region goes when that connection closes.
    connection: int


def map_region(name: str, fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of the app's memfd, read-write; refuse one that could shrink."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RegionRefused(
            f"region {name!r}: the descriptor is not a memfd; create the region with "
            "memfd_create(MFD_ALLOW_SEALING) and seal it with F_SEAL_SHRINK"
        ) from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise RegionRefused(
            f"region {name!r} is not sealed against shrinking (F_SEAL_SHRINK): "
            "shrinking a mapped region would crash the agent"
        )
    have = os.fstat(fd).st_size
    if have < size:
        raise RegionRefused(f"region {name!r}: the memfd holds {have} bytes, {size} were registered")
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise RegionRefused(f"region {name!r} cannot be mapped read-write: {exc}") from None


class Regions:
    """Every tenant's registered regions; a tenant reaches only its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_tenant: dict[str, dict[str, Region]] = {}

    def register(self, tenant: str, name: str, size: int, fd: int, connection: int) -> Region:
        if not REGION_NAME.fullmatch(name):
            raise RegionRefused(f"invalid region name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
        if not 0 < size <= MAX_REGION_BYTES:
            raise RegionRefused(f"region {name!r}: byte_size must be 1..{MAX_REGION_BYTES}, got {size}")
        with self._lock:
            own = self._by_tenant.get(tenant, {})
            if name in own:
                raise RegionRefused(f"tenant {tenant!r} already has a region {name!r}; unregister it first")
            if len(own) >= MAX_REGIONS_PER_TENANT:
                raise RegionRefused(f"tenant {tenant!r} has {len(own)} regions, the most a tenant may hold")
        memory = map_region(name, fd, size)
        region = Region(tenant, name, size, memory, connection)
        with self._lock:
            own = self._by_tenant.setdefault(tenant, {})
            if name in own:  # registered meanwhile by another connection of the tenant
                raise RegionRefused(f"tenant {tenant!r} already has a region {name!r}; unregister it first")
            own[name] = region
        return region

    def get(self, tenant: str, name: str) -> Region:
        region = self._by_tenant.get(tenant, {}).get(name)
        if region is None:
            raise RegionRefused(f"tenant {tenant!r} has no region {name!r}; register it first")
        return region

    def unregister(self, tenant: str, name: str) -> None:
        with self._lock:
            if self._by_tenant.get(tenant, {}).pop(name, None) is None:
                raise RegionRefused(f"tenant {tenant!r} has no region {name!r}")

    def drop_connection(self, connection: int) -> int:
        """Forget the regions a closed connection registered; the mappings go with their last view."""
        with self._lock:
            gone = 0
            for own in self._by_tenant.values():
                for name in [n for n, r in own.items() if r.connection == connection]:
                    del own[name]
                    gone += 1
            return gone


def _within(region: Region, offset: int, size: int, what: str) -> None:
    if offset + size > region.size:
        raise RegionRefused(
            f"{what}: bytes {offset}..{offset + size} lie outside region {region.name!r} of {region.size} bytes"
        )


def input_view(regions: Regions, tenant: str, slot: inference_pb2.SharedMemorySlot) -> np.ndarray:
    """The input as a numpy view of the tenant's region, after checking it lies within it."""
    what = f"input {slot.name!r}"
    region = regions.get(tenant, slot.region)
    if slot.dtype not in DTYPES:
        raise RegionRefused(f"{what}: unknown dtype {slot.dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    shape = tuple(int(d) for d in slot.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise RegionRefused(f"{what}: shape {list(shape)} is not a tensor shape")
    dtype = np.dtype(slot.dtype)
    size = math.prod(shape) * dtype.itemsize
    if slot.byte_size != size:
        raise RegionRefused(
            f"{what}: shape {list(shape)} of {slot.dtype} is {size} bytes, the slot says {slot.byte_size}"
        )
    _within(region, slot.offset, size, what)
    if slot.offset % dtype.itemsize:
        raise RegionRefused(
            f"{what}: offset {slot.offset} is not a multiple of {dtype.itemsize} ({slot.dtype})"
        )
    view: np.ndarray = np.ndarray(shape, dtype, buffer=region.memory, offset=slot.offset)
    return view


@dataclass(frozen=True)
class OutputSlot:
    name: str
    region: Region
    offset: int
    size: int


def output_slots(
    regions: Regions, tenant: str, serving: ServingModel, slots: list[inference_pb2.SharedMemorySlot]
) -> list[OutputSlot]:
    """Where each output goes, checked against the region and, for a fixed shape, the model."""
    if not slots:
        raise InvalidInput("name at least one output and the slot it is written to")
    specs = {s.name: s for s in serving.model.outputs}
    out: list[OutputSlot] = []
    for slot in slots:
        what = f"output {slot.name!r}"
        spec = specs.get(slot.name)
        if spec is None:
            raise InvalidInput(f"unknown output {slot.name!r}; the model has {sorted(specs)}")
        if any(o.name == slot.name for o in out):
            raise InvalidInput(f"{what} is named twice")
        region = regions.get(tenant, slot.region)
        _within(region, slot.offset, slot.byte_size, what)
        if spec.shape and all(d >= 0 for d in spec.shape):
            need = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
            if need > slot.byte_size:
                raise RegionRefused(
                    f"{what} is {need} bytes ({spec.dtype} {list(spec.shape)}), its slot holds {slot.byte_size}"
                )
        out.append(OutputSlot(slot.name, region, slot.offset, slot.byte_size))
    return out


def write_outputs(
    slots: list[OutputSlot], outputs: dict[str, np.ndarray], result: inference_pb2.SharedMemoryResult
) -> None:
    """Every output into its slot, or none: all are checked before the first is written."""
    for slot in slots:
        array = outputs[slot.name]
        if array.nbytes > slot.size:
            raise RegionRefused(
                f"output {slot.name!r} is {array.nbytes} bytes ({array.dtype} {list(array.shape)}), "
                f"its slot holds {slot.size}; nothing was written"
            )
        if dtype_name(array.dtype) is None:
            raise InvalidInput(f"output {slot.name!r} is {array.dtype}, which no slot can hold")
    for slot in slots:
        array = outputs[slot.name]
        np.ndarray(array.shape, array.dtype, buffer=slot.region.memory, offset=slot.offset)[...] = array
        entry = result.outputs.add()
        entry.name = slot.name
        entry.dtype = dtype_name(array.dtype) or ""
        entry.shape.extend(array.shape)
        entry.byte_size = array.nbytes


@dataclass
class _Connection:
    id: int
    peer: str
    tenant: str | None = None
    token: str | None = None


class SharedMemoryServer:
    def __init__(self, path: Path, calls: LocalInference, access: TenantAccess) -> None:
        self.path = path
        self.calls = calls
        self.access = access
        self.regions = Regions()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    def start(self, socket_mode: int = 0o660, socket_group: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # left over by a previous run that was killed
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Bound under a tight umask, so the socket is never reachable wider than its mode.
        old_umask = os.umask(0o777 & ~socket_mode)
        try:
            listener.bind(str(self.path))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, socket_mode)
        if socket_group:
            try:
                os.chown(self.path, -1, grp.getgrnam(socket_group).gr_gid)
            except (KeyError, PermissionError) as exc:
                listener.close()
                raise ConfigError(
                    f"cannot give the socket to group {socket_group!r} (the agent must be a member): {exc}"
                ) from None
        listener.listen(MAX_CONNECTIONS)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, name="shm-accept", daemon=True)
        self._acceptor.start()
        log.info("shared-memory fast path serving socket=%s", self.path)

    def stop(self, timeout: float) -> None:
        """Stop accepting, end every connection; calls in flight get ``timeout`` s to finish."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            connections = list(self._connections.values())
        for conn, _ in connections:
            # Wakes its thread; an answer in progress still goes out.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("fast path accept failed")
                time.sleep(0.1)
                continue
            with self._lock:
                full = len(self._connections) >= MAX_CONNECTIONS
                if not full:
                    cid = next(self._ids)
                    thread = threading.Thread(
                        target=self._serve, args=(conn, cid), name=f"shm-{cid}", daemon=True
                    )
                    self._connections[cid] = (conn, thread)
            if full:
                self._answer(
                    conn, _error("RESOURCE_EXHAUSTED", f"{MAX_CONNECTIONS} connections are open; try later")
                )
                conn.close()
            else:
                thread.start()

    def _serve(self, conn: socket.socket, cid: int) -> None:
        state = _Connection(cid, _peer(conn))
        buffer = bytearray(MAX_PACKET)
        try:
            while not self._stopping.is_set():
                try:
                    payload, fds = receive(conn, buffer)
                except PacketError as exc:
                    self._answer(conn, _error("INVALID_ARGUMENT", str(exc)))
                    continue
                except OSError:
                    return
                if not payload and not fds:
                    return  # the app closed the connection
                try:
                    response = self._handle(state, payload, fds)
                except Exception as exc:
                    log.exception("fast path request crashed tenant=%s peer=%s", state.tenant, state.peer)
                    response = _error("INTERNAL", f"request failed: {exc}")
                if not self._answer(conn, response):
                    return
        finally:
            gone = self.regions.drop_connection(cid)
            with self._lock:
                self._connections.pop(cid, None)
            conn.close()
            if state.tenant is not None:
                log.info(
                    "fast path closed tenant=%s peer=%s regions_dropped=%d", state.tenant, state.peer, gone
                )

    @staticmethod
    def _answer(conn: socket.socket, response: inference_pb2.SharedMemoryResponse) -> bool:
        try:
            send(conn, response.SerializeToString())
            return True
        except OSError:
            return False

    def _handle(
        self, state: _Connection, payload: bytes, fds: list[int]
    ) -> inference_pb2.SharedMemoryResponse:
        try:
            try:
                request = inference_pb2.SharedMemoryRequest.FromString(payload)
            except DecodeError:
                raise InvalidInput("the packet is not a SharedMemoryRequest") from None
            kind = request.WhichOneof("kind")
            if fds and kind != "register":
                raise InvalidInput("only a register request carries a descriptor")
            if kind == "open":
                return self._open(state, request.open)
            if state.tenant is None:
                raise Unauthenticated(
                    "open the connection first (SharedMemoryOpen: the tenant and its token)"
                )
            self.access.check(state.token, state.tenant, WHERE_TOKEN)
            if kind == "infer":
                return self._infer(state.tenant, request.infer)
            if kind == "register":
                if len(fds) != 1:
                    raise RegionRefused(f"a register request carries the region's descriptor, got {len(fds)}")
                self.regions.register(
                    state.tenant, request.register.name, request.register.byte_size, fds[0], state.id
                )
                log.info(
                    "region registered tenant=%s region=%s bytes=%d peer=%s",
                    state.tenant,
                    request.register.name,
                    request.register.byte_size,
                    state.peer,
                )
                return _ok(state.tenant)
            if kind == "unregister":
                self.regions.unregister(state.tenant, request.unregister.name)
                return _ok(state.tenant)
            raise InvalidInput("empty request: open, register, unregister or infer")
        except AgentError as exc:
            if state.tenant is not None or not isinstance(exc, InvalidInput):
                log.info(
                    "fast path refused tenant=%s peer=%s code=%s error=%s",
                    state.tenant,
                    state.peer,
                    status_of(exc),
                    exc,
                )
            return _error(status_of(exc), str(exc))
        finally:
            # The mapping, when one was made, keeps the memory; the descriptor is never kept.
            close_all(fds)

    def _open(
        self, state: _Connection, request: inference_pb2.SharedMemoryOpen
    ) -> inference_pb2.SharedMemoryResponse:
        tenant = request.tenant or DEFAULT_TENANT
        if state.tenant is not None and state.tenant != tenant:
            raise InvalidInput(
                f"this connection acts for tenant {state.tenant!r}; open another for {tenant!r}"
            )
        token = request.token or None
        self.access.check(token, tenant, WHERE_TOKEN)
        state.tenant, state.token = tenant, token
        log.info("fast path opened tenant=%s peer=%s", tenant, state.peer)
        return _ok(tenant)

    def _infer(
        self, tenant: str, request: inference_pb2.SharedMemoryInfer
    ) -> inference_pb2.SharedMemoryResponse:
        serving = self.calls.serving(tenant)
        # Every slot is checked before anything runs: a bad one refuses the call untouched.
        inputs: dict[str, np.ndarray] = {}
        for slot in request.inputs:
            if slot.name in inputs:
                raise InvalidInput(f"input {slot.name!r} is named twice")
            inputs[slot.name] = input_view(self.regions, tenant, slot)
        slots = output_slots(self.regions, tenant, serving, list(request.outputs))
        answer = self.calls.infer(
            tenant,
            serving,
            lambda: inputs,
            [s.name for s in slots],
            request.timeout_ms / 1000.0 or None,
            lent=True,
        )
        response = inference_pb2.SharedMemoryResponse()
        result = response.result
        write_outputs(slots, answer.outputs, result)
        result.model_name = serving.model_name
        result.model_version = serving.model_version
        result.latency_ms = answer.latency_ms
        return response


def _ok(tenant: str) -> inference_pb2.SharedMemoryResponse:
    return inference_pb2.SharedMemoryResponse(ok=inference_pb2.SharedMemoryOk(tenant=tenant))


def _error(code: str, message: str) -> inference_pb2.SharedMemoryResponse:
    return inference_pb2.SharedMemoryResponse(
        error=inference_pb2.SharedMemoryError(code=code, message=message)
    )


def _peer(conn: socket.socket) -> str:
    """pid/uid of the app at the other end, for the logs (the kernel vouches for them)."""
    try:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return "unknown"
    return f"pid:{pid}/uid:{uid}"
