"""Linux connection tracking as a flow source: a dump of the table, then NEW and DESTROY events.

    sources:
      conntrack:
        netns: null            # a named network namespace (ip netns) to watch instead of ours
        enable: false          # let the agent turn on tracking (nftables `ct state new` rule)
                               # and accounting (net.netfilter.nf_conntrack_acct=1) if they are off

Flows use the *original* tuple (what the local side sent); when NAT rewrote the destination the
reply tuple's source is kept as `nat_dst`. Bytes and packets are the original direction's
counters (what left the host), present only with accounting on; DESTROY events carry the totals.

Why a hand decoder: pyroute2's generic parser costs 125-340 us per entry here. `decode_entry` walks
the attributes a flow needs with `struct`; `Decoder` then learns each message layout once (per
message length) and reads later messages of that layout with two precompiled Structs, after
checking every attribute header the fields depend on (~6 us per entry). Tests prove both equal to
pyroute2's `nfct_msg` on real kernel messages, and that a forged layout falls back. Where the
optional C module is built, live events are read by `_ctnl.drain` instead: one recvmmsg(2) for up to
64 datagrams and the same decoding rules in C (~1 us per event instead of ~13 us of Python); tests
hold it equal to `decode_entry` on real, kernel-shaped and damaged messages.

Event overflow (ENOBUFS) is counted and answered with a new dump, never fatal.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import time
from typing import NamedTuple

from agent.errors import UserError
from agent.flow import Flow
from agent.wire import netlink as nl

try:  # optional C reader of the event socket (see _ctnl.c); the Python loop in `events` is equivalent
    from agent.sources.conntrack import _ctnl
except ImportError:  # pragma: no cover - built wherever a compiler exists
    _ctnl = None
DRAIN = {"c": _ctnl is not None}  # tests switch the C reader off to compare both
MAX_DATAGRAMS = 512  # per drain, then return, so the caller can do its periodic work during a storm

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
GROUP_NEW, GROUP_DESTROY = 1, 4  # bit masks of NFNLGRP_CONNTRACK_NEW (1) and _DESTROY (3)
NLM_F_CREATE = 0x400
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8
# Added latency per wake-up: the events of 50 ms share one hand-off, one evidence write and one metrics
# flush. bench_live, % of a core per 1,000 flows/s at 2,000 and 10,000 flows/s: 9.1 and 4.7 with a
# 2 ms pause, 4.3 and 3.6 with 50 ms. The socket buffer (8 MiB, SO_RCVBUFFORCE) holds 50 ms of far more.
COALESCE_SECONDS = 0.05

_attr = struct.Struct("=HH").unpack_from
_be16 = struct.Struct(">H").unpack_from
_be32 = struct.Struct(">I").unpack_from
_be64 = struct.Struct(">Q").unpack_from
_ntop = socket.inet_ntop
AF4, AF6 = socket.AF_INET, socket.AF_INET6


def _attrs(p, off: int, end: int):
    """(type, payload start, payload end) of each netlink attribute in p[off:end]. A header whose
    length is under 4 or runs past `end` ends the walk (as the kernel's own nla_ok)."""
    while off + 4 <= end:
        alen, atype = _attr(p, off)
        if alen < 4 or off + alen > end:
            return
        yield atype & 0x7FFF, off + 4, off + alen
        off += (alen + 3) & ~3


class CtEntry(NamedTuple):
    """One decoded conntrack message: identity, original tuple, NAT, original-direction counters.

    A NamedTuple, not a frozen dataclass: built once per kernel message, its C constructor is
    several microseconds cheaper per entry.
    """

    ct_id: int  # 32 bits, not unique on its own: identify a flow by entry[:6] (id and tuple)
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    packets: int
    bytes: int
    start_ns: int  # kernel timestamp (nf_conntrack_timestamp=1), else 0
    nat_src: str | None
    nat_dst: str | None

    def flow(self, now: float, last: float | None = None) -> Flow:
        first = self.start_ns / 1e9 if self.start_ns else now
        return Flow(self.proto, self.src, self.sport, self.dst, self.dport, self.packets, self.bytes, first,
                    last or now, "conntrack")


# Fixed layouts the kernel emits for TCP/UDP/SCTP tuples: every attribute header is checked
# against the expected (length, type); anything else takes the generic walk in `_tuple`.
_V4 = struct.Struct("=HHHH4sHH4sHHHHB3xHHBB2xHHBB2x")
_V6 = struct.Struct("=HHHH16sHH16sHHHHB3xHHBB2xHHBB2x")
_V4_HDRS = (20, 1, 8, 1, 8, 2, 28, 2, 5, 1, 6, 2, 6, 3)
_V6_HDRS = (44, 1, 20, 3, 20, 4, 28, 2, 5, 1, 6, 2, 6, 3)


_LAYOUTS = ((_V4, _V4_HDRS), (_V6, _V6_HDRS))


def _raw_tuple(p, off: int, end: int):
    """(src bytes, dst bytes, proto, sport, dport) of a CTA_TUPLE_* nest starting at `off`."""
    for layout, expected in _LAYOUTS:
        if end - off != layout.size:  # exactly these attributes: anything more takes the generic walk
            continue
        v = layout.unpack_from(p, off)
        if (v[0], v[1] & 0x7FFF, v[2], v[3], v[5], v[6], v[8], v[9] & 0x7FFF, v[10], v[11], v[13], v[14],
                v[17], v[18]) == expected:
            return v[4], v[7], v[12], v[15] << 8 | v[16], v[19] << 8 | v[20]
    return _tuple(p, off, end)


def _tuple(p, off: int, end: int):
    """Generic walk of a CTA_TUPLE_* nest (ICMP, odd layouts): raw addresses, proto, ports. The
    last of a repeated attribute wins; a field shorter than its type is ignored."""
    src = dst = None
    proto = sport = dport = 0
    for t, a, b in _attrs(p, off, end):
        if t == 1:  # CTA_TUPLE_IP
            for it, c, d in _attrs(p, a, b):
                if it in (1, 3):
                    src = bytes(p[c:d])
                elif it in (2, 4):
                    dst = bytes(p[c:d])
        elif t == 2:  # CTA_TUPLE_PROTO
            for it, c, d in _attrs(p, a, b):
                if it == 1 and d - c >= 1:
                    proto = p[c]
                elif it == 2 and d - c >= 2:
                    sport = _be16(p, c)[0]
                elif it == 3 and d - c >= 2:
                    dport = _be16(p, c)[0]
    return src, dst, proto, sport, dport


def _ip(raw: bytes) -> str:
    return _ntop(AF4 if len(raw) == 4 else AF6, raw)


def _counters(p, off: int, end: int):
    pk = by = 0
    for t, a, b in _attrs(p, off, end):
        if t == 1 and b - a >= 8:
            pk = _be64(p, a)[0]
        elif t == 2 and b - a >= 8:
            by = _be64(p, a)[0]
    return pk, by


def decode_entry(p, off: int = 0, n: int | None = None) -> CtEntry | None:
    """Decode one ctnetlink message payload (after the netlink header) in p[off:n].

    None when it carries no usable original tuple: none at all, or an address (original or reply)
    that is neither 4 nor 16 bytes. Works in place on the received datagram. The reference for
    the learned layouts below and for the C decoder (`_ctnl.c`); tests hold all three equal.
    """
    n = len(p) if n is None else n
    orig = reply = None
    ct_id = pk = by = start = 0
    for t, a, b in _attrs(p, off + 4, n):  # after struct nfgenmsg
        if t == 1:
            orig = _raw_tuple(p, a, b)
        elif t == 2:
            reply = _raw_tuple(p, a, b)[:2]
        elif t == 9:
            pk, by = _counters(p, a, b)
        elif t == 12 and b - a >= 4:
            ct_id = _be32(p, a)[0]
        elif t == 20:  # CTA_TIMESTAMP: nested START (1)
            for it, c, d in _attrs(p, a, b):
                if it == 1 and d - c >= 8:
                    start = _be64(p, c)[0]
    if orig is None or not _addr_ok(orig[0]) or not _addr_ok(orig[1]):
        return None
    src, dst, proto, sport, dport = orig
    nat_dst = nat_src = None
    if reply is not None and reply[0]:
        if not _addr_ok(reply[0]) or (reply[1] and not _addr_ok(reply[1])):
            return None
        if reply[0] != dst:
            nat_dst = _ip(reply[0])
        if reply[1] and reply[1] != src:
            nat_src = _ip(reply[1])
    return CtEntry(ct_id, proto, _ip(src), sport, _ip(dst), dport, pk, by, start, nat_src, nat_dst)


def _addr_ok(raw) -> bool:
    return raw is not None and len(raw) in (4, 16)


class _Layout:
    """A learned message layout: where each header and field sits, as two precompiled Structs.

    `hdr` reads every attribute header the fields depend on (native order) and must equal
    `expect`; only then are the fields read with `val` (network order). So a template can only
    ever be used on a message whose structure it has checked, attribute by attribute.
    """

    __slots__ = ("hdr", "expect", "val", "fields", "idx", "opt")

    def __init__(self, headers: list[int], fields: list[tuple[str, int, str]], payload: bytes):
        self.hdr = struct.Struct("=" + _fmt([(h, "I") for h in headers]))
        self.expect = self.hdr.unpack_from(payload)
        fields = sorted(fields, key=lambda f: f[1])
        self.val = struct.Struct(">" + _fmt([(pos, code) for _, pos, code in fields]))
        self.fields = tuple(name for name, _, _ in fields)
        at = {name: i for i, name in enumerate(self.fields)}
        self.idx = tuple(at[k] for k in ("id", "proto", "src", "sport", "dst", "dport", "rsrc", "rdst"))
        self.opt = tuple(at.get(k) for k in ("packets", "bytes", "start"))  # absent without acct/timestamps


def _fmt(items) -> str:
    out, at = "", 0
    for pos, code in sorted(items):
        out += f"{pos - at}x{code}" if pos > at else code
        at = pos + struct.calcsize(code)
    return out


def _nested(p, a: int, b: int, headers: list, fields: list, names: dict):
    """Record the headers of the attributes nested in p[a:b], and the fields `names` maps."""
    for t, c, d in _attrs(p, a, b):
        headers.append(c - 4)
        name, code = names.get(t, (None, None))
        if name:
            fields.append((name, c, code or f"{d - c}s"))


def _learn(p: bytes) -> _Layout | None:
    """Walk one message payload generically, recording header and field positions."""
    headers, fields = [], []
    for t, a, b in _attrs(p, 4, len(p)):  # after struct nfgenmsg
        headers.append(a - 4)
        if t in (1, 2):  # tuples: addresses (their size is the attribute's), proto, ports
            for it, c, d in _attrs(p, a, b):
                headers.append(c - 4)
                if it == 1:  # CTA_TUPLE_IP
                    pre = "" if t == 1 else "r"
                    _nested(p, c, d, headers, fields, {1: (pre + "src", None), 2: (pre + "dst", None),
                                                       3: (pre + "src", None), 4: (pre + "dst", None)})
                elif it == 2 and t == 1:  # CTA_TUPLE_PROTO
                    _nested(p, c, d, headers, fields, {1: ("proto", "B"), 2: ("sport", "H"), 3: ("dport", "H")})
        elif t == 9:
            _nested(p, a, b, headers, fields, {1: ("packets", "Q"), 2: ("bytes", "Q")})
        elif t == 20:
            _nested(p, a, b, headers, fields, {1: ("start", "Q")})
        elif t == 12:
            fields.append(("id", a, "I"))
    need = {"src", "dst", "proto", "sport", "dport", "rsrc", "rdst", "id"}
    if not need <= {f[0] for f in fields}:
        return None  # ICMP and other shapes without ports: the generic decoder handles them
    return _Layout(headers, fields, p)


class Decoder:
    """Decodes datagrams of ctnetlink messages, learning layouts (by message length) as it goes."""

    def __init__(self):
        self.layouts: dict[int, _Layout | None] = {}

    def entry(self, data: bytes, off: int, end: int) -> CtEntry | None:
        length = end - off
        lay = self.layouts.get(length)
        if lay is not None and lay.hdr.unpack_from(data, off) == lay.expect:
            v = lay.val.unpack_from(data, off)
            i_id, i_proto, i_src, i_sport, i_dst, i_dport, i_rsrc, i_rdst = lay.idx
            i_pk, i_by, i_start = lay.opt
            src, dst, rsrc, rdst = v[i_src], v[i_dst], v[i_rsrc], v[i_rdst]
            return CtEntry(v[i_id], v[i_proto], _ip(src), v[i_sport], _ip(dst), v[i_dport],
                           0 if i_pk is None else v[i_pk], 0 if i_by is None else v[i_by],
                           0 if i_start is None else v[i_start], _ip(rdst) if rdst != src else None,
                           _ip(rsrc) if rsrc != dst else None)
        e = decode_entry(data, off, end)
        if e is not None and length not in self.layouts and len(self.layouts) < 256:
            self.layouts[length] = _learn(bytes(data[off:end]))
        return e

    def entries(self, data: bytes):
        """(message kind, flags, CtEntry or None) for each ctnetlink message in one datagram.

        kind is the ctnetlink message type (NEW=0, DELETE=2), or -1 for NLMSG_DONE, -2 for errors
        (then the entry slot holds the errno).
        """
        off, n = 0, len(data)
        hdr = nl._hdr.unpack_from
        while off + 16 <= n:
            length, mtype, flags, _seq, _pid = hdr(data, off)
            if length < 16 or off + length > n:
                break
            if mtype == nl.NLMSG_DONE:
                yield -1, flags, None
            elif mtype == nl.NLMSG_ERROR:
                yield -2, flags, -struct.unpack_from("=i", data, off + 16)[0]
            else:
                yield mtype & 0xFF, flags, self.entry(data, off + 16, off + length)
            off += (length + 3) & ~3


def entries(data: bytes):
    """Stateless `Decoder().entries` (no layouts carried between calls)."""
    return Decoder().entries(data)


def _dump_request(family: int = 0) -> tuple[int, int, bytes]:
    return ((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, nl.NLM_F_DUMP, struct.pack("=BBH", family, 0, 0))


def dump(sock: socket.socket, buf: bytearray | None = None, decoder: Decoder | None = None):
    """Yield every CtEntry of the table through `sock` (a NETLINK_NETFILTER socket)."""
    decoder = decoder or Decoder()
    mtype, flags, payload = _dump_request()
    nl.request(sock, mtype, flags, payload, seq=int(time.monotonic() * 1000) & 0xFFFFFFFF)
    buf = buf or bytearray(1 << 20)
    while True:
        n = sock.recv_into(buf)
        for kind, _fl, e in decoder.entries(bytes(buf[:n])):
            if kind == -1:
                return
            if kind == -2:
                if e:
                    raise OSError(e, f"conntrack dump: {os.strerror(e)}")
                continue
            if e is not None:
                yield e


class Conntrack:
    """Events (NEW, DESTROY) from the kernel with a resynchronising dump.

    `events(timeout)` yields ("new"|"destroy"|"dump", CtEntry) and returns after `timeout` seconds
    without traffic so the caller can check for shutdown. Counters: `overflows`, `errors`.
    """

    def __init__(self, netns: str | None = None, event_filter=None):
        self.netns = netns
        self.ev = nl.open_socket(nl.NETLINK_NETFILTER, GROUP_NEW | GROUP_DESTROY, netns)
        if event_filter is not None:
            from agent.sources.conntrack.filter import attach

            attach(self.ev, event_filter)
        self.q = nl.open_socket(nl.NETLINK_NETFILTER, 0, netns)
        self.buf = bytearray(1 << 20)
        self.overflows = 0
        self.errors = 0
        self.needs_dump = True
        self.dumps = 0
        self._last_drain = 0
        self.skipped_new = 0  # NEW events of flows that are not egress, left out by the C reader
        self.decoder = Decoder()

    def socket_drops(self) -> int:
        """Events the kernel dropped for our event socket (buffer full): SO_MEMINFO's drop counter."""
        return struct.unpack_from("=9I", self.ev.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[SK_MEMINFO_DROPS]

    def close(self):
        self.ev.close()
        self.q.close()

    def snapshot(self) -> list[CtEntry]:
        return list(dump(self.q, self.buf, self.decoder))

    def events(self, timeout: float = 0.5, table=None):
        """("dump"|"resync"|"new"|"destroy", CtEntry, accountable) triples, to iterate once: the
        first dump is "dump", a dump after lost events is "resync"; then events until the socket is
        empty (or `timeout` passes idle). With the C reader, a list read before this returns.

        `table` (`scope_table`): the C reader leaves out NEW events whose flow is not egress
        (counted in `skipped_new`) and gives the others `accountable` as True or False, as
        `Scoper.classify` would; everywhere else `accountable` is None (the caller classifies)."""
        if self.needs_dump:
            return self._dump_then_events(timeout, table)
        return self._events(timeout, table)

    def _dump_then_events(self, timeout: float, table):
        self.needs_dump = False
        kind = "resync" if self.dumps else "dump"
        self.dumps += 1
        for e in dump(self.q, self.buf, self.decoder):
            yield kind, e, None
        yield from self._events(timeout, table)

    def _events(self, timeout: float, table=None):
        r, _, _ = select.select([self.ev], [], [], timeout)
        if not r:
            return ()
        # At low rates let a few more events arrive before draining: each wake-up otherwise carries
        # one event through the queue to the worker (most of the per-flow cost at 1-2k flows/s).
        # Under load (the last drain was large) there is no pause.
        if self._last_drain < 32:
            time.sleep(COALESCE_SECONDS)
        if _ctnl is not None and DRAIN["c"]:
            try:
                evs, drained, status, skipped = _ctnl.drain(self.ev.fileno(), MAX_DATAGRAMS, CtEntry, table)
            except OSError:
                self.errors += 1
                raise
            self.skipped_new += skipped
            if status == 2:  # ENOBUFS: the kernel dropped events; count and resync
                self.overflows += 1
                self.needs_dump = True
            else:
                self._last_drain = drained
            return evs
        return self._events_py()

    def _events_py(self):
        """The Python reader: one recv and one decode per datagram."""
        drained = 0
        for _ in range(MAX_DATAGRAMS):
            try:
                n = self.ev.recv_into(self.buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._last_drain = drained
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: count and resync
                    self.overflows += 1
                    self.needs_dump = True
                    return
                self.errors += 1
                raise
            drained += 1
            for kind, flags, e in self.decoder.entries(bytes(self.buf[:n])):
                if e is None or kind < 0:
                    continue
                if kind == IPCTNL_MSG_CT_NEW and flags & NLM_F_CREATE:
                    yield "new", e, None
                elif kind == IPCTNL_MSG_CT_DELETE:
                    yield "destroy", e, None
        self._last_drain = drained  # a full drain: no pause before the next one


def scope_table(scoper, inbound: int = 0):
    """The C reader's form of `scoper`'s tables (see `Conntrack.events`), or None without it.
    `inbound`: 0 leave out inbound flows, 1 keep them (not accountable), 2 keep them accountable."""
    if _ctnl is None or not DRAIN["c"]:
        return None
    from agent.enrich.scope import LOCAL64, TEREDO

    codes = {"public": 0, TEREDO: 2, LOCAL64: 3}
    r4, r6 = scoper.ranges(4), scoper.ranges(6)
    c4 = bytes(codes.get(x, 1) for _, _, x in r4)
    if any(c > 1 for c in c4):
        raise ValueError("the IPv4 scope table holds an embedded-address marker")
    return _ctnl.scope_table([s for s, _, _ in r4], c4, [s for s, _, _ in r6],
                             bytes(codes.get(x, 1) for _, _, x in r6), inbound)


def read_sysctl(name: str, netns: str | None = None) -> str | None:
    """A sysctl as seen from `netns` (sysctl files are per network namespace)."""
    path = "/proc/sys/" + name.replace(".", "/")
    if not netns:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    r = subprocess.run(["ip", "netns", "exec", netns, "cat", path], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def enable_tracking(netns: str | None = None, scoper=None, inbound: bool = False) -> list[str]:
    """Turn on tracking, the kernel flow counter and accounting; returns what was done.

    Installs `kernel_count.nft_table(scoper, inbound)` (table inet egress_agent). Needs CAP_NET_ADMIN.
    """
    from agent.enrich.scope import Scoper
    from agent.sources.conntrack.kernel_count import install

    done = []
    err = install(scoper or Scoper(), netns, inbound)
    if err:
        raise UserError(f"conntrack enable: nft failed: {err}")
    done.append("nftables table inet egress_agent (tracking and the kernel flow counter"
                + (", inbound connections counted too)" if inbound else ")"))
    pre = ["ip", "netns", "exec", netns] if netns else []
    for key in ("net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp"):
        r = subprocess.run(pre + ["sysctl", "-q", "-w", f"{key}=1"], capture_output=True, text=True)
        if r.returncode == 0:
            done.append(f"{key}=1")
    return done


def snapshot(netns: str | None = None):
    """`egress-agent audit --conntrack`: one dump as flows, with input stats for the report."""
    ct = Conntrack(netns)
    try:
        entries = ct.snapshot()
    finally:
        ct.close()
    now = time.time()
    acct = read_sysctl("net.netfilter.nf_conntrack_acct", netns)
    warnings = []
    if not entries:
        warnings.append("conntrack table is empty: the kernel may not be tracking connections in this "
                        "namespace (no netfilter rule needs conntrack); see `enable` in the daemon config")
    if acct != "1":
        warnings.append("net.netfilter.nf_conntrack_acct is off: flows have no byte or packet counts")
    stats = {"path": f"conntrack:{netns or 'host'}", "format": "conntrack", "link_types": [], "packets": None,
             "entries": len(entries), "malformed": 0, "truncated": False, "truncated_offset": None,
             "warnings": warnings}
    return [e.flow(now) for e in entries], stats
