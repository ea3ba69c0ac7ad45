"""Who sent a flow: socket diagnostics for uid and socket inode, /proc for the rest.

    attribution:
      enabled: true
      proc: /proc            # injectable for tests

`Attributor.who(flow)` returns a `Who`: pid, command, executable, uid, user, systemd unit and
container id (from the cgroup path), or `Who(unattributed=reason)` where reason is one of
`socket-gone` (no local socket owns the tuple now: short-lived, or forwarded/NATed traffic that
never had one here), `no-process` (socket found, no process holds it now: the uid and user are
still given), `no-permission` (the agent may not read other users' /proc/PID/fd, which needs
CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: uid and user are still given; see `permission()`),
`unsupported-protocol`. Lookups are exact (one sock_diag request per flow, by
tuple); the inode->pid map is a bounded cache rebuilt from /proc at most every 200 ms on a miss.

Why not pyroute2's DiagSocket here: it only dumps whole socket tables; an exact lookup per new
flow is one small request.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from agent.flow import Flow, Who
from agent.wire import netlink as nl

try:
    from agent.sources.conntrack._ctnl import diag_exact as _c_diag
except ImportError:  # the C module is optional
    _c_diag = None

SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_REQ = struct.Struct("=BBBBI HH 16s 16s I II")  # inet_diag_req_v2 (ports/addresses in network order)
_MSG = struct.Struct("=BBBB HH 16s 16s I II IIIII")  # inet_diag_msg
_EXACT = struct.Struct("=IHHII BBBBI HH 16s 16s I II")  # netlink header + inet_diag_req_v2
_CONTAINER = re.compile(r"(?:docker|crio|cri-containerd|libpod|containerd)[-/:]([0-9a-f]{12,64})"
                        r"|/([0-9a-f]{64})(?:\.scope)?$")
_UNIT = re.compile(r"([^/]+\.(?:service|scope))$")


@dataclass(frozen=True, slots=True)
class Options:
    enabled: bool = True
    proc: str = "/proc"
    netns: str | None = None


_PACKED: dict[str, tuple[int, bytes]] = {}
_NOT_ASKED = object()


def _exact_message(seq: int, fam: int, proto: int, sport: int, dport: int, src: bytes, dst: bytes) -> bytes:
    """The netlink message of one exact sock_diag request (see `Attributor._request`)."""
    return _EXACT.pack(16 + _REQ.size, SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST, seq, 0, fam, proto, 0, 0, 0xFFFFFFFF,
                       socket.htons(sport), socket.htons(dport), src, dst, 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)


def _answer(data: bytes, length: int, mtype: int) -> tuple[int, int] | None:
    """(uid, inode) from the answer to an exact request, or None (NLMSG_ERROR: no such socket)."""
    if mtype == SOCK_DIAG_BY_FAMILY and 16 + _MSG.size <= length <= len(data):
        f = _MSG.unpack_from(data, 16)
        return (f[14], f[15]) if f[15] else None
    return None


def _pack_addr(text: str) -> tuple[int, bytes]:
    """(family, 16-byte sock_diag address) of an address in text; inet_pton, not ipaddress (per flow).
    Memoised: a host's flows come from a handful of local addresses."""
    hit = _PACKED.get(text)
    if hit is not None:
        return hit
    if ":" in text:
        hit = socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text)
    else:
        hit = socket.AF_INET, socket.inet_pton(socket.AF_INET, text) + bytes(12)
    if len(_PACKED) >= 4096:
        _PACKED.clear()
    _PACKED[text] = hit
    return hit


def _user(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def cgroup_identity(cgroup_text: str) -> tuple[str | None, str | None]:
    """(systemd unit, container id) from /proc/PID/cgroup contents."""
    unit = container = None
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        m = _CONTAINER.search(path)
        if m and not container:
            container = (m.group(1) or m.group(2))[:64]
        for part in reversed(path.split("/")):
            u = _UNIT.search(part)
            if u:
                name = u.group(1)
                if not name.startswith(("docker-", "cri-containerd-", "crio-", "libpod-")):
                    unit = unit or name
                break
    return unit, container


class Attributor:
    def __init__(self, options: Options = Options()):
        self.options = options
        self.proc = options.proc
        self._sock = None
        self._inodes: dict[int, int] = {}
        self._scanned = 0.0
        self._who: OrderedDict[tuple, tuple] = OrderedDict()  # (pid, uid) -> (when, Who), bounded
        self._udp: dict[int, tuple[float, dict]] = {}
        self._seq = 1
        self._pre: dict[tuple, tuple | None] = {}  # prefetch's answers, by flow tuple, until taken
        self.lookups = 0
        self.failures = 0
        self.denied = self.permission() is not None

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _diag(self):
        if self._sock is None:
            self._sock = nl.open_socket(nl.NETLINK_SOCK_DIAG, 0, self.options.netns, rcvbuf=1 << 20)
            self._sock.settimeout(1.0)
        return self._sock

    def _request(self, flow) -> tuple | None:
        """(family, proto, sport, dport, src, dst) of the exact request that names the flow's socket,
        or None (not TCP or UDP, or mixed families). The kernel looks a UDP socket up as it would
        for an arriving datagram, whose source is the remote end (udp_dump_one): remote first.
        That also finds unconnected sockets."""
        if flow.proto not in (6, 17):
            return None
        fam, src = _pack_addr(flow.src)
        fam2, dst = _pack_addr(flow.dst)
        if fam != fam2:
            return None
        if flow.proto == 6:
            return fam, 6, flow.sport, flow.dport, src, dst
        return fam, 17, flow.dport, flow.sport, dst, src

    def prefetch(self, flows) -> int:
        """Ask the kernel about many flows' sockets at once: one `send` holding every exact request
        (the kernel answers each during it), then their answers read back; `socket_of` takes a
        flow's answer from here instead of asking alone. Returns how many were answered; a flow
        whose answer did not come (or any error) is simply asked alone later.

        Why: per flow, a request costs a send and a receive system call and their Python around
        them (~15 us at 10,000 flows/s in bench_live), more than judging the flow. In C
        (agent.sources.conntrack._ctnl.diag_exact) where it is built: packing, sending, reading and parsing."""
        if not self.options.enabled or not flows:
            return 0
        if len(self._pre) > 65536:  # answers nobody took (their flows went elsewhere): bounded
            self._pre.clear()
        try:
            s = self._diag()
            answers = self._batch_c(s, flows) if _c_diag is not None else self._batch_py(s, flows)
        except OSError:
            return 0
        pre = self._pre
        got = 0
        for f, a in zip(flows, answers, strict=True):
            if a is not False:
                pre[(f.proto, f.src, f.sport, f.dst, f.dport)] = a
                got += 1
        return got

    def _batch_c(self, s, flows) -> list:
        seq0 = (self._seq + 1) & 0xFFFFFFFF
        self._seq = (self._seq + len(flows)) & 0xFFFFFFFF
        return _c_diag(s.fileno(), flows, seq0)

    def _batch_py(self, s, flows) -> list:
        """`_ctnl.diag_exact` in Python: per flow its answer, None (no such socket) or False (not
        asked, or no answer came)."""
        answers: list = [False] * len(flows)
        by_seq = {}
        parts = []
        for i, f in enumerate(flows):
            r = self._request(f)
            if r is not None:
                self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
                by_seq[seq] = i
                parts.append(_exact_message(seq, *r))
        if not parts:
            return answers
        try:
            s.send(b"".join(parts))
            for _ in range(len(parts)):  # every answer is queued during the send
                data = s.recv(1 << 16, socket.MSG_DONTWAIT)
                if len(data) < 16:
                    continue
                length, mtype, _flags, seq, _pid = nl._hdr.unpack_from(data)
                i = by_seq.pop(seq, None)
                if i is not None:
                    answers[i] = _answer(data, length, mtype)
        except (BlockingIOError, TimeoutError):
            pass  # an answer lost to a full buffer: that flow is asked alone
        return answers

    def socket_of(self, flow: Flow) -> tuple[int, int] | None:
        """(uid, inode) of the local socket that owns the flow, by exact tuple lookup (answered by
        `prefetch` when it asked already)."""
        found = self._pre.pop((flow.proto, flow.src, flow.sport, flow.dst, flow.dport), _NOT_ASKED)
        if found is _NOT_ASKED:
            r = self._request(flow)
            if r is None:
                return None
            found = self._exact(*r)
        if found is None and flow.proto == 17:
            # The socket closed before we asked: a table of UDP sockets by local port, dumped at most
            # every 200 ms (not once per flow: start-up dumps are big), may still hold it.
            found = self._udp_table(_pack_addr(flow.src)[0]).get(flow.sport)
        return found

    def _exact(self, fam: int, proto: int, sport: int, dport: int, src: bytes, dst: bytes) -> tuple[int, int] | None:
        """(uid, inode) of the socket one exact request names, or None. The kernel answers during
        the send with one message; each request has its own sequence number, so an answer that
        arrives after its request timed out is skipped, never taken for the next one's."""
        s = self._diag()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        s.send(_exact_message(seq, fam, proto, sport, dport, src, dst))
        while True:
            try:
                data = s.recv(1 << 16)
            except (TimeoutError, OSError):
                return None
            if len(data) < 16:
                return None
            length, mtype, _flags, got, _pid = nl._hdr.unpack_from(data)
            if got != seq:
                continue
            return _answer(data, length, mtype)

    def _udp_table(self, fam: int) -> dict:
        now = time.monotonic()
        cached = self._udp.get(fam)
        if cached and now - cached[0] < 0.2:
            return cached[1]
        req = _REQ.pack(fam, 17, 0, 0, 0xFFFFFFFF, 0, 0, bytes(16), bytes(16), 0,
                        INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        table = self._ask(req, nl.NLM_F_DUMP, collect=True) or {}
        self._udp[fam] = (now, table)
        return table

    def _ask(self, req: bytes, flags: int, collect: bool = False):
        """One sock_diag request: (uid, inode) of the first answer, or {local port: (uid, inode)}."""
        s = self._diag()
        nl.request(s, SOCK_DIAG_BY_FAMILY, flags, req)
        result = {} if collect else None
        while True:
            try:
                data = s.recv(1 << 16)
            except (TimeoutError, OSError):
                return result
            for mt, _fl, pl in nl.messages(data):
                if mt == nl.NLMSG_ERROR:
                    return result
                if mt == nl.NLMSG_DONE:
                    return result
                if mt == SOCK_DIAG_BY_FAMILY and len(pl) >= _MSG.size:
                    f = _MSG.unpack_from(pl)
                    lport, uid, inode = socket.ntohs(f[4]), f[14], f[15]
                    if collect:
                        if inode:
                            result.setdefault(lport, (uid, inode))
                    elif result is None and inode:
                        result = (uid, inode)
            if not flags & nl.NLM_F_DUMP:
                return result

    def _scan(self):
        """inode -> pid for every socket fd in /proc (bounded by the number of sockets)."""
        table = {}
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    table[int(link[8:-1])] = int(pid)
        self._inodes = table
        self._scanned = time.monotonic()

    def permission(self) -> str | None:
        """None when other users' socket fds can be read; otherwise why not (one line for logs).

        Probed on pid 1, which never belongs to an unprivileged agent. Without the permission a
        /proc scan finds nothing but our own sockets, so `who` does not scan and says so.
        """
        try:
            if os.stat(f"{self.proc}/1").st_uid == os.geteuid():
                return None
            os.listdir(f"{self.proc}/1/fd")
        except PermissionError:
            return ("cannot read other users' /proc/PID/fd (needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH; "
                    "under systemd install systemd/egress-agent.service.d/attribution.conf); flows carry uid "
                    "and user only")
        except OSError:
            return None
        return None

    def pid_of(self, inode: int) -> int | None:
        pid = self._inodes.get(inode)
        if pid is None and time.monotonic() - self._scanned > 0.2:
            self._scan()
            pid = self._inodes.get(inode)
        return pid

    def process(self, pid: int, uid: int | None) -> Who:
        def read(name):
            try:
                with open(f"{self.proc}/{pid}/{name}") as f:
                    return f.read()
            except OSError:
                return ""

        comm = read("comm").strip() or None
        try:
            exe = os.readlink(f"{self.proc}/{pid}/exe")
        except OSError:
            exe = None
        unit, container = cgroup_identity(read("cgroup"))
        return Who(pid=pid, comm=comm, exe=exe, uid=uid, user=_user(uid), unit=unit, container=container)

    def who(self, flow: Flow) -> Who:
        if not self.options.enabled:
            return None
        self.lookups += 1
        if flow.proto not in (6, 17):
            return Who(unattributed="unsupported-protocol")
        try:
            found = self.socket_of(flow)
        except OSError:
            found = None
        if found is None:
            self.failures += 1
            return Who(unattributed="socket-gone")
        uid, inode = found
        if self.denied:
            return Who(uid=uid, user=_user(uid), unattributed="no-permission")
        pid = self.pid_of(inode)
        if pid is None:  # e.g. no permission to read other users' /proc/PID/fd: uid still says who
            self.failures += 1
            return Who(uid=uid, user=_user(uid), unattributed="no-process")
        now = time.monotonic()
        hit = self._who.get((pid, uid))
        if hit is not None and now - hit[0] < 5.0:  # short TTL: pids are reused
            return hit[1]
        who = self.process(pid, uid)
        self._who[(pid, uid)] = (now, who)
        if len(self._who) > 4096:
            self._who.popitem(last=False)
        return who
