"""The shared-memory fast path's packets, shared by the agent's server and the apps' client.

A SOCK_SEQPACKET Unix socket keeps each message whole (no length prefix to frame) and
carries a region's file descriptor beside the packet that registers it (SCM_RIGHTS).
One ``SharedMemoryRequest`` per packet, one ``SharedMemoryResponse`` back, protobuf
(``inference.proto``). Imports only the standard library and the contract, so an app's
client needs neither the agent's runtimes nor gRPC.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path

# Requests and responses are names, offsets and shapes: a few hundred bytes.
MAX_PACKET = 64 * 1024
# A packet carries at most one region's descriptor; room for a few more, all closed.
MAX_FDS = 4
REGION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def fast_path_socket(grpc_socket: Path) -> Path:
    """The fast path's socket, beside the gRPC one: ``inference.sock`` -> ``inference.sock.shm``."""
    return grpc_socket.with_name(grpc_socket.name + ".shm")


def send(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(payload)


class PacketError(Exception):
    """A packet cut short (bigger than MAX_PACKET) or carrying more descriptors than allowed."""


def receive(sock: socket.socket, buffer: bytearray) -> tuple[bytes, list[int]]:
    """One packet and the descriptors that came with it (the caller owns and closes them);
    ``b""`` when the peer closed. A packet too long raises PacketError, its descriptors closed."""
    size, ancillary, flags, _ = sock.recvmsg_into([buffer], socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise PacketError(
            f"packet cut short: more than {MAX_PACKET} bytes or {MAX_FDS} descriptors (flags {flags:#x})"
        )
    return bytes(memoryview(buffer)[:size]), fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
