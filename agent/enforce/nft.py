"""The agent's enforcement table: rendered from a Plan, applied in one transaction through libnftables.

Why libnftables in-process (ctypes over libnftables.so.1, the library `nft` itself is) rather than
running `nft -f`: a table with `flags owner` belongs to the netlink socket that made it and is
removed by the kernel when that socket closes, so fail-open must hold the socket for the life of
the agent: a SIGKILL then leaves nothing refused. `nft -f` would close it as it exits. A kernel
without owner tables (before 5.12) gets a plain table, removed at stop and by the unit's
`ExecStopPost=`; `fail: closed` asks for the plain table on purpose (it outlives the agent).

Every change is one buffer: `delete table` + the whole new table, which the kernel applies as one
transaction, so a table that fails to load (too many elements, a kernel without a feature) leaves
the previous one in force.

The table (`inet egress_agent_enforce`):

    chain output (hook output, and forward with `forward: true`): established and related packets,
      loopback and the never-refuse sets pass; everything else goes through `refuse`.
    chain refuse: per policy, `[ip saddr @pN_src4] [l4proto/ports/uid] ip daddr @pN_dst4 jump pN`
    chain pN: allowed names pass (`pN_names4/6`, filled from DNS answers), then counter `pN`,
      the connection is remembered in `pN_seen4/6` (source, destination, protocol, port; bounded,
      with a timeout) for the evidence, and rejected: TCP reset, else ICMP administratively prohibited.

Names race: a program connects as soon as its DNS answer arrives, and the agent sees that answer
at the same moment, so its address reaches `pN_names` a few milliseconds after the first SYN may
have left. For a policy that allows by name, the first TCP SYN or UDP datagram of a (source,
destination, protocol, port) to a refused address is therefore dropped silently and remembered
for GRACE seconds in `pN_grace4/6`; the retransmission (TCP: one second later) passes if the name
has been allowed meanwhile, and is refused (reset) otherwise. It costs a refused connection one
second, never an allowed one a refusal. (Holding DNS answers in an NFQUEUE would cost nothing in
the refused case, but needs nft_queue in the kernel and a way to never stall DNS when the agent
hangs; this needs neither.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import threading
import time

TABLE = "egress_agent_enforce"  # beside the conntrack source's `egress_agent` (tracking, counter)
SEEN_SIZE = 65536
GRACE = 3  # seconds a policy that allows by name remembers a first packet it dropped (see render)


class NftError(Exception):
    pass


class Nft:
    """One libnftables context: one netlink socket, kept open (the owner of the table)."""

    def __init__(self):
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise NftError(f"libnftables is not installed ({e}): apt install libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for f in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
            getattr(lib, f).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for f in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, f).argtypes = [ctypes.c_void_p]
            getattr(lib, f).restype = ctypes.c_char_p
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.lock = threading.Lock()

    def run(self, text: str, as_json: bool = False) -> str:
        with self.lock:
            self.lib.nft_ctx_output_set_flags(self.ctx, (1 << 4) if as_json else 0)
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
            out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
            err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(err.strip().splitlines()[0] if err.strip() else f"nft returned {rc}")
        return out

    def json(self, text: str) -> list:
        out = self.run(text, as_json=True)
        return json.loads(out).get("nftables", []) if out.strip() else []

    def close(self):
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


def _addr(v: int, n: int) -> str:
    return str(ipaddress.IPv4Address(n) if v == 4 else ipaddress.IPv6Address(n))


def elements(v: int, spans) -> str:
    """nft interval elements: a prefix where the span is one, else a range."""
    out = []
    for lo, hi in spans:
        size = hi - lo + 1
        if size & (size - 1) == 0 and lo % size == 0:
            bits = (32 if v == 4 else 128) - (size.bit_length() - 1)
            out.append(_addr(v, lo) if size == 1 else f"{_addr(v, lo)}/{bits}")
        else:
            out.append(f"{_addr(v, lo)}-{_addr(v, hi)}")
    return ", ".join(out)


def _set(name: str, v: int, spans, extra: str = "") -> str:
    typ = "ipv4_addr" if v == 4 else "ipv6_addr"
    body = f"type {typ}; flags interval;{extra}"
    if spans:
        body += f" elements = {{ {elements(v, spans)} }};"
    return f"  set {name} {{ {body} }}\n"


def _ranges(ports) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def render(plan, owner: bool = True, forward: bool = False, seen_timeout: int = 300,
           replace: bool = False, names=frozenset()) -> str:
    """The whole table as nft text (with `replace`: preceded by the deletion of the old one).
    `names`: the policies that allow by host name, whose first packet waits a retransmission."""
    head = f"delete table inet {TABLE}\n" if replace else ""
    t = [f"table inet {TABLE} {{\n"]
    if owner:
        t.append("  flags owner\n")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(plan.built_at))
    t.append(f"  comment \"egress-agent: built {stamp} in {plan.seconds:.2f} s from {plan.pieces} pieces\"\n")
    t.append(_set("never4", 4, plan.keep[4]))
    t.append(_set("never6", 6, plan.keep[6]))
    rules = []
    for i, p in enumerate(plan.policies):
        pre = f"p{i}"
        t.append(f"  counter {pre} {{ comment \"{p.name}\"; }}\n")
        for v, fam in ((4, "ip"), (6, "ip6")):
            typ = "ipv4_addr" if v == 4 else "ipv6_addr"
            t.append(_set(f"{pre}_dst{v}", v, p.dst[v]))
            t.append(f"  set {pre}_names{v} {{ type {typ}; flags timeout; }}\n")
            if p.name in names:
                t.append(f"  set {pre}_grace{v} {{ type {typ} . {typ} . inet_proto . inet_service; flags dynamic, "
                         f"timeout; timeout {GRACE}s; size {SEEN_SIZE}; }}\n")
            t.append(f"  set {pre}_seen{v} {{ type {typ} . {typ} . inet_proto . inet_service; flags dynamic, timeout; "
                     f"timeout {seen_timeout}s; size {SEEN_SIZE}; }}\n")
            if not p.any_source:
                if not p.sources[v]:
                    continue  # the policy selects no source of this family
                t.append(_set(f"{pre}_src{v}", v, p.sources[v]))
            match = [] if p.any_source else [f"{fam} saddr @{pre}_src{v}"]
            if p.protocols:
                match.append(f"meta l4proto {{ {', '.join(map(str, p.protocols))} }}")
            if p.ports:
                if not p.protocols:
                    match.append("meta l4proto { tcp, udp, sctp, dccp }")
                match.append(f"th dport {{ {_ranges(p.ports)} }}")
            if p.uids:
                match.append(f"meta skuid {{ {', '.join(map(str, p.uids))} }}")
            if p.dst[v]:
                rules.append(" ".join([f"meta nfproto {'ipv4' if v == 4 else 'ipv6'}", *match,
                                       f"{fam} daddr @{pre}_dst{v}", f"jump {pre}"]))
    t.append("  chain refuse {\n" + "".join(f"    {r}\n" for r in rules) + "  }\n")
    for i, p in enumerate(plan.policies):
        pre = f"p{i}"
        grace = "" if p.name not in names else "".join(
            f"    meta l4proto {{ tcp, udp }} {fam} saddr . {fam} daddr . meta l4proto . th dport != @{pre}_grace{v} "
            f"add @{pre}_grace{v} {{ {fam} saddr . {fam} daddr . meta l4proto . th dport }} drop\n"
            for v, fam in ((4, "ip"), (6, "ip6")))
        seen = "".join(f"    meta l4proto {{ tcp, udp }} update @{pre}_seen{v} "
                       f"{{ {fam} saddr . {fam} daddr . meta l4proto . th dport }}\n"
                       for v, fam in ((4, "ip"), (6, "ip6")))
        t.append(f"  chain {pre} {{\n"
                 f"    ip daddr @{pre}_names4 return\n    ip6 daddr @{pre}_names6 return\n{grace}"
                 f"    counter name {pre}\n{seen}"
                 f"    meta l4proto tcp reject with tcp reset\n"
                 f"    reject with icmpx admin-prohibited\n  }}\n")
    gate = ("    ct state established,related accept\n    oifname \"lo\" accept\n"
            "    ip daddr @never4 accept\n    ip6 daddr @never6 accept\n    jump refuse\n")
    t.append(f"  chain output {{\n    type filter hook output priority filter; policy accept;\n{gate}  }}\n")
    if forward:
        t.append(f"  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{gate}  }}\n")
    t.append("}\n")
    return head + "".join(t)
