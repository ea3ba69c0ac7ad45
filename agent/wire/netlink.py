"""Minimal netlink plumbing shared by the conntrack source and socket attribution.

Why not pyroute2's socket classes on the hot path: pyroute2 0.9 routes every message through an
asyncio core and a generic parser (125-340 us per conntrack entry here). We keep its role as the
reference parser in tests and do the few syscalls ourselves with the standard `socket` module.

`in_netns(name)` runs a block with the calling thread inside a named network namespace
(/run/netns/NAME, as `ip netns` makes them); sockets created there stay bound to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import threading

from agent.errors import UserError

NETLINK_NETFILTER = 12
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
CLONE_NEWNET = 0x40000000
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

_hdr = struct.Struct("=IHHII")
_libc = None


def _setns(fd: int):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str | None):
    """Enter network namespace `name` for this thread only; None means stay where we are."""
    if not name:
        yield
        return
    path = name if name.startswith("/") else f"/run/netns/{name}"
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"--netns {name}: cannot open {path} ({e.strerror})") from None
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        try:
            _setns(target)
        except OSError as e:
            raise UserError(f"--netns {name}: cannot enter ({e.strerror}; needs CAP_SYS_ADMIN)") from None
        yield
    finally:
        try:
            _setns(home)
        finally:
            os.close(home)
            os.close(target)


def open_socket(proto: int, groups: int = 0, netns: str | None = None, rcvbuf: int = 8 << 20) -> socket.socket:
    with in_netns(netns):
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
        except PermissionError:
            raise UserError("netlink: permission denied (needs CAP_NET_ADMIN)") from None
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root); falls back below
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((0, groups))
    return s


def request(sock: socket.socket, msg_type: int, flags: int, payload: bytes, seq: int = 1):
    sock.send(_hdr.pack(16 + len(payload), msg_type, flags | NLM_F_REQUEST, seq, 0) + payload)


def messages(buf: bytes):
    """(type, flags, payload memoryview) per netlink message in one datagram."""
    mv = memoryview(buf)
    off, n = 0, len(buf)
    unpack = _hdr.unpack_from
    while off + 16 <= n:
        length, mtype, flags, _seq, _pid = unpack(buf, off)
        if length < 16 or off + length > n:
            break
        yield mtype, flags, mv[off + 16:off + length]
        off += (length + 3) & ~3

