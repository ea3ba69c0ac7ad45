"""A classic BPF filter for the conntrack event socket: irrelevant flows never reach Python.

Why: a storm of loopback, private or inbound connections would otherwise fill the socket buffer
(the kernel then drops events, relevant ones included) and cost the agent CPU per event. The
kernel runs this program on every event before queueing it; it drops an event only when it is
*sure* the flow is not egress (`Scoper.is_egress` false) nor, when some policy judges inbound
connections (`program(scoper, inbound=True)`), inbound (a public source, a non-public destination),
and passes everything it cannot read.

What it reads (ctnetlink event layout: nlmsghdr 16 | nfgenmsg 4 | CTA_TUPLE_ORIG first):

    IPv4: CTA_TUPLE_IP @24, CTA_IP_V4_SRC @28 (addr @32), CTA_IP_V4_DST @36 (addr @40)
    IPv6: CTA_TUPLE_IP @24, CTA_IP_V6_SRC @28 (addr @32..47), CTA_IP_V6_DST @48 (addr @52..67)

Each attribute header is checked before its address is used. IPv4 is exact: the source is tested
against the public intervals and the destination against the non-public ones of the scope table.
IPv6 is conservative: only the top 32 bits are compared, against /32 blocks that lie wholly in
one class (plus an exact test for ::1), so a mixed block always passes to Python, which decides.
Tests run the program in a small interpreter against `is_egress` and attach it in a namespace.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from agent.enrich.scope import EMBEDDED_MARKERS, Scoper, merge_intervals

SO_ATTACH_FILTER = 26
# cBPF opcodes (linux/filter.h)
LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_W_LEN = 0x20, 0x28, 0x30, 0x80
ALU_AND_K = 0x54
JEQ, JGT, JGE = 0x15, 0x25, 0x35
RET_K = 0x06
ACCEPT, DROP = 0xFFFFFFFF, 0
AF_INET, AF_INET6 = 2, 10
NLA_F_NESTED = 0x8000


def _word(length: int, atype: int) -> int:
    """An attribute header (host order) as BPF loads it (a big-endian 32-bit word)."""
    return struct.unpack(">I", struct.pack("=HH", length, atype))[0]


_NESTED_MASK = ~_word(0, NLA_F_NESTED) & 0xFFFFFFFF


class _Asm:
    """Instructions with symbolic jump targets, resolved to 8-bit relative offsets."""

    def __init__(self):
        self.ins: list[list] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0):
        self.ins.append([code, jt, jf, k & 0xFFFFFFFF])

    def label(self, name: str):
        self.labels[name] = len(self.ins)

    def program(self) -> list[tuple[int, int, int, int]]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for j in (jt, jf):
                off = self.labels[j] - i - 1 if isinstance(j, str) else j
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump out of range at {i}: {off}")
                offs.append(off)
            out.append((code, offs[0], offs[1], k))
        return out


def _in_intervals(a: _Asm, intervals, hit: str, miss: str):
    """Jump to `hit` when the accumulator is inside one of the sorted disjoint intervals."""
    for lo, hi in intervals:
        nxt = f"next.{len(a.ins)}"
        a.op(JGE, lo, 0, miss)  # below this interval: below every later one too
        a.op(JGT, hi, nxt, hit)
        a.label(nxt)
    a.op(JGE, 0, miss, miss)  # unconditional jump


def _classes(scoper: Scoper, version: int):
    """(public, non-public) intervals; for IPv6, of the top 32 bits over /32-pure blocks."""
    rows = scoper.ranges(version)
    if version == 4:
        pub = [(lo, hi) for lo, hi, s in rows if s == "public"]
        non = [(lo, hi) for lo, hi, s in rows if s != "public" and s not in EMBEDDED_MARKERS]
        return merge_intervals(pub), merge_intervals(non)
    pub, non = [], []
    for lo, hi, s in rows:
        first = (lo + (1 << 96) - 1) >> 96  # first /32 block wholly inside [lo, hi]
        last = ((hi + 1) >> 96) - 1
        if first > last or s in EMBEDDED_MARKERS:
            continue
        (pub if s == "public" else non).append((first, last))
    return merge_intervals(pub), merge_intervals(non)


def program(scoper: Scoper, inbound: bool = False) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions. `inbound`: also pass the events of connections a
    public peer opened to a local host (the mirror of egress; when some policy judges inbound)."""
    a = _Asm()
    a.op(LD_W_LEN)
    a.op(JGE, 44, 0, "accept")
    a.op(LD_B_ABS, 16)  # nfgenmsg.nfgen_family
    a.op(JEQ, AF_INET, "v4", 0)
    a.op(JEQ, AF_INET6, "v6", "accept")
    a.label("accept")
    a.op(RET_K, ACCEPT)
    for version, src_hdr, dst_hdr, tuple_len, src_at, dst_at, dst_hdr_at in (
            (4, _word(8, 1), _word(8, 2), 20, 32, 40, 36), (6, _word(20, 3), _word(20, 4), 44, 32, 52, 48)):
        pub, non = _classes(scoper, version)
        v = f"v{version}"
        # each block ends in its own return instructions: jumps stay short (8-bit offsets)
        drop, accept = f"{v}.drop", f"{v}.accept"
        a.label(v)
        if version == 6:
            a.op(LD_W_LEN)
            a.op(JGE, 68, 0, accept)
        a.op(LD_W_ABS, 24)
        a.op(ALU_AND_K, _NESTED_MASK)
        a.op(JEQ, _word(tuple_len, 1) & _NESTED_MASK, 0, accept)
        a.op(LD_W_ABS, 28)
        a.op(JEQ, src_hdr, 0, accept)
        a.op(LD_W_ABS, dst_hdr_at)
        a.op(JEQ, dst_hdr, 0, accept)
        a.op(LD_W_ABS, src_at)
        _in_intervals(a, pub, f"{v}in" if inbound else drop, f"{v}dst")
        a.label(f"{v}dst")
        if version == 6:  # ::1 exactly
            for i, want in enumerate((0, 0, 0, 1)):
                a.op(LD_W_ABS, dst_at + 4 * i)
                a.op(JEQ, want, 0, "v6top")
            if inbound:  # to ::1 from a source surely not public
                a.op(JGE, 0, "v6srcnon", "v6srcnon")
            else:
                a.op(RET_K, DROP)
            a.label("v6top")
        a.op(LD_W_ABS, dst_at)
        if inbound and version == 6:
            # IPv6 classes are /32-coarse: a source not surely public may still be public (then the
            # flow is inbound); drop only when the source is surely not public either
            _in_intervals(a, non, f"{v}srcnon", accept)
            a.label(f"{v}srcnon")
            for i, want in enumerate((0, 0, 0, 1)):  # ::1 exactly
                a.op(LD_W_ABS, src_at + 4 * i)
                a.op(JEQ, want, 0, "v6srctop")
            a.op(RET_K, DROP)
            a.label("v6srctop")
            a.op(LD_W_ABS, src_at)
        _in_intervals(a, non, drop, accept)
        if inbound:  # the source is public: an inbound connection unless the destination is public too
            a.label(f"{v}in")
            a.op(LD_W_ABS, dst_at)
            _in_intervals(a, pub, drop, accept)
        a.label(accept)
        a.op(RET_K, ACCEPT)
        a.label(drop)
        a.op(RET_K, DROP)
    return a.program()


def attach(sock: socket.socket, prog: list[tuple[int, int, int, int]]):
    """SO_ATTACH_FILTER; the kernel copies the program, so the buffer need not outlive the call."""
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in prog))
    fprog = struct.pack("=HxxxxxxQ" if struct.calcsize("P") == 8 else "=HxxI", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def run(prog, packet: bytes) -> int:
    """Execute `prog` on `packet` as the kernel would (the subset of cBPF this module emits).

    Used by the tests to compare the filter with `Scoper.is_egress`; an out-of-bounds load
    returns 0 (drop), as in the kernel.
    """
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == RET_K:
            return k
        if code == LD_W_LEN:
            acc = len(packet)
        elif code in (LD_W_ABS, LD_H_ABS, LD_B_ABS):
            size = {LD_W_ABS: 4, LD_H_ABS: 2, LD_B_ABS: 1}[code]
            if k + size > len(packet):
                return 0
            acc = int.from_bytes(packet[k:k + size], "big")
        elif code == ALU_AND_K:
            acc &= k
        elif code in (JEQ, JGT, JGE):
            ok = acc == k if code == JEQ else acc > k if code == JGT else acc >= k
            pc += jt if ok else jf
        else:
            raise ValueError(f"opcode {code:#x} not emitted by this module")
