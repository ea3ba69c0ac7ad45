"""Address scope from the IANA special-purpose address registries, and embedded IPv4.

Why not `ipaddress.is_private` / `is_global`: they call 198.51.100.0/24 private and 64:ff9b::/96
non-global, and they cannot say *which* special purpose a range has. Residency verdicts need that
distinction (documentation vs private vs shared CGNAT), so the tables below follow
iana-ipv4-special-registry and iana-ipv6-special-registry, longest prefix wins.

Contract: `Scoper(public_nets=..., local_nets=...).scope(ip)` returns one of SCOPES.
`public_nets` are treated as public whatever the registry says (deployments and tests that use
documentation ranges as stand-ins for the Internet); `local_nets` are always "local".
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from functools import lru_cache
from socket import AF_INET as _AF4
from socket import AF_INET6 as _AF6
from socket import inet_pton as _pton

SCOPES = (
    "public", "private", "shared", "loopback", "link-local", "multicast", "documentation",
    "benchmarking", "reserved", "unspecified", "broadcast", "local",
)

# (network, scope). Ranges the registry marks globally reachable inside a larger reserved block are
# listed as "public" so the longest match gives them back to the Internet.
_V4 = [
    ("0.0.0.0/8", "reserved"), ("0.0.0.0/32", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.0.9/32", "public"), ("192.0.0.10/32", "public"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "public"),  # AS112-v4
    ("192.52.193.0/24", "public"),  # AMT
    ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "public"),  # AS112 direct delegation
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("233.252.0.0/24", "documentation"),  # MCAST-TEST-NET
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
]
_V6 = [
    ("::/128", "unspecified"), ("::1/128", "loopback"),
    # 64:ff9b:1::/48 (RFC 8215, local-use IPv4/IPv6 translation) is not listed: like 64:ff9b::/96 it
    # carries an IPv4 destination, and takes that address's scope (see embedded_ipv4)
    ("100::/64", "reserved"), ("100:0:0:1::/64", "reserved"),
    ("2001::/23", "reserved"),
    ("2001:1::1/128", "public"), ("2001:1::2/128", "public"), ("2001:1::3/128", "public"),
    ("2001:3::/32", "public"), ("2001:4:112::/48", "public"),
    ("2001:20::/28", "public"), ("2001:30::/28", "public"),
    ("2001:2::/48", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("2620:4f:8000::/48", "public"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "reserved"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
]


def _table(rows):
    nets = [(ipaddress.ip_network(n), s) for n, s in rows]
    nets.sort(key=lambda ns: ns[0].prefixlen, reverse=True)  # longest prefix first
    return nets


_TABLE = {4: _table(_V4), 6: _table(_V6)}

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form: mapped, nat64, nat64-local, 6to4 or teredo.

    nat64-local (64:ff9b:1::/48, RFC 8215) is read as operators deploy it, a /96 translation
    prefix inside the /48 with the IPv4 address in the last 32 bits (RFC 6052's /96 format)."""
    if addr.ipv4_mapped is not None:
        return "mapped", addr.ipv4_mapped
    if addr in _NAT64:
        return "nat64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _NAT64_LOCAL:
        return "nat64-local", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIXTOFOUR:
        return "6to4", ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF)
    if addr in _TEREDO:
        return "teredo", ipaddress.IPv4Address(~int(addr) & 0xFFFFFFFF)  # client, obfuscated
    return None


def embedded_int(n: int) -> int | None:
    """`embedded_ipv4` on integers: the IPv4 address (as an int) an IPv6 address carries, or None."""
    if n >> 32 == 0xFFFF:
        return n & 0xFFFFFFFF
    if n >> 32 == _NAT64_BASE >> 32:
        return n & 0xFFFFFFFF
    if n >> 80 == 0x64FF9B0001:
        return n & 0xFFFFFFFF
    if n >> 112 == 0x2002:
        return (n >> 80) & 0xFFFFFFFF
    if n >> 96 == 0x20010000:
        return ~n & 0xFFFFFFFF
    return None


def registry_scope(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Scope from the IANA tables alone; IPv6 forms that embed IPv4 take the IPv4 scope."""
    if addr.version == 6:
        emb = embedded_ipv4(addr)
        if emb is not None:
            return registry_scope(emb[1])
    for net, scope in _TABLE[addr.version]:
        if addr in net:
            return scope
    if addr.version == 6 and addr not in ipaddress.ip_network("2000::/3"):
        return "reserved"  # outside global unicast space
    return "public"


def parse_nets(values, what: str) -> tuple:
    """CIDR strings -> networks; a bad value is a UserError naming the setting."""
    from agent.errors import UserError

    out = []
    for v in values or ():
        try:
            out.append(ipaddress.ip_network(str(v), strict=False))
        except ValueError:
            raise UserError(f"{what}: '{v}' is not an IP network (CIDR)") from None
    return tuple(out)


# Where an IPv6 address carries an IPv4 one, as (region, how the IPv4 bits sit in it). Teredo
# obfuscates the client (~low 32 bits), which no interval of IPv6 addresses can express: the table
# marks that region TEREDO and the lookup resolves it through the IPv4 table.
TEREDO = "teredo"
LOCAL64 = "nat64-local"  # 64:ff9b:1::/48: the IPv4 address is the last 32 bits of each /96 in it
EMBEDDED_MARKERS = (TEREDO, LOCAL64)  # regions the tables cannot flatten: resolved per address
_MAPPED, _NAT64_BASE, _SIXTOFOUR_BASE = 0xFFFF << 32, int(_NAT64.network_address), 0x2002 << 112
_BITS = {4: 32, 6: 128}


def _flatten(entries, bits: int) -> list[tuple[int, int, str]]:
    """Non-overlapping sorted (start, end, scope) intervals covering the whole address space.

    `entries` are (start, end, rank, scope); where they overlap the highest rank wins (rank is the
    prefix length for registry rows, so the longest prefix wins, and higher for overrides).
    """
    top = (1 << bits) - 1
    cuts = sorted({0} | {s for s, _, _, _ in entries} | {e + 1 for _, e, _, _ in entries if e < top})
    out: list[tuple[int, int, str]] = []
    for i, lo in enumerate(cuts):
        hi = cuts[i + 1] - 1 if i + 1 < len(cuts) else top
        scope = max((r, v) for s, e, r, v in entries if s <= lo and hi <= e)[1]
        if out and out[-1][2] == scope and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi, scope)
        else:
            out.append((lo, hi, scope))
    return out


def merge_intervals(intervals) -> list[tuple[int, int]]:
    """Sorted (lo, hi) intervals with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and out[-1][1] + 1 >= lo:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _net_entry(net, rank: int, scope: str):
    return int(net.network_address), int(net.broadcast_address), rank, scope


def build_tables(public_nets=(), local_nets=()) -> dict[int, list[tuple[int, int, str]]]:
    """The integer interval tables {4: [...], 6: [...]} for a deployment's overrides.

    Precedence, highest first: `local_nets`, `public_nets`, the IPv4 scope of an embedded IPv4
    address (mapped, NAT64, 6to4; Teredo via the TEREDO marker), the IANA registries (longest prefix).
    """
    v4 = [(0, (1 << 32) - 1, -1, "public")]
    v4 += [_net_entry(ipaddress.ip_network(n), ipaddress.ip_network(n).prefixlen, s) for n, s in _V4]
    v4 += [_net_entry(n, 200, "public") for n in public_nets if n.version == 4]
    v4 += [_net_entry(n, 300, "local") for n in local_nets if n.version == 4]
    t4 = _flatten(v4, 32)
    v6 = [(0, (1 << 128) - 1, -1, "reserved"), _net_entry(ipaddress.ip_network("2000::/3"), 3, "public")]
    v6 += [_net_entry(ipaddress.ip_network(n), ipaddress.ip_network(n).prefixlen, s) for n, s in _V6]
    for s, e, scope in t4:
        v6.append((_MAPPED | s, _MAPPED | e, 150, scope))
        v6.append((_NAT64_BASE | s, _NAT64_BASE | e, 150, scope))
        v6.append((_SIXTOFOUR_BASE | s << 80, _SIXTOFOUR_BASE | e << 80 | ((1 << 80) - 1), 150, scope))
    v6.append(_net_entry(_TEREDO, 150, TEREDO))
    v6.append(_net_entry(_NAT64_LOCAL, 150, LOCAL64))
    v6 += [_net_entry(n, 200, "public") for n in public_nets if n.version == 6]
    v6 += [_net_entry(n, 300, "local") for n in local_nets if n.version == 6]
    return {4: t4, 6: _flatten(v6, 128)}


def ip_parse(ip: str) -> tuple[int, int]:
    """(version, integer) of an address in text form; ValueError when it is not one. Not
    memoised: for addresses that seldom repeat (see `ip_int`)."""
    try:
        if ":" in ip:
            return 6, int.from_bytes(_pton(_AF6, ip), "big")
        return 4, int.from_bytes(_pton(_AF4, ip), "big")
    except (OSError, TypeError):
        raise ValueError(f"{ip!r} does not appear to be an IPv4 or IPv6 address") from None


# `ip_parse`, memoised: the source, the locator and the policy masks all ask for the same address
ip_int = lru_cache(maxsize=65536)(ip_parse)


class Scoper:
    """Scope of an address under a deployment's settings.

    Why integer tables: `ipaddress` objects cost microseconds to build and the registries have ~25
    networks per family to test one by one; the flattened interval table answers with one bisect.
    `ranges(version)` exposes the same table, so the kernel-side filters (nft sets, the conntrack
    socket filter) are built from exactly what `scope` answers.
    """

    def __init__(self, public_nets=(), local_nets=()):
        self.public_nets = parse_nets(public_nets, "public network")
        self.local_nets = parse_nets(local_nets, "local network")
        self.tables = build_tables(self.public_nets, self.local_nets)
        self._starts = {v: [s for s, _, _ in t] for v, t in self.tables.items()}
        self._scopes = {v: [x for _, _, x in t] for v, t in self.tables.items()}
        self.scope = lru_cache(maxsize=65536)(self._scope)
        self.classify = lru_cache(maxsize=65536)(self._classify)
        self._index = None  # scope_many's numpy form of the tables, built on first use

    def ranges(self, version: int) -> list[tuple[int, int, str]]:
        return self.tables[version]

    def scope_int(self, version: int, n: int) -> str:
        scope = self._scopes[version][bisect_right(self._starts[version], n) - 1]
        if scope == TEREDO:
            return self._scopes[4][bisect_right(self._starts[4], ~n & 0xFFFFFFFF) - 1]
        if scope == LOCAL64:
            return self._scopes[4][bisect_right(self._starts[4], n & 0xFFFFFFFF) - 1]
        return scope

    def _scope(self, ip: str) -> str:
        return self.scope_int(*ip_int(ip))

    def scope_many(self, v4, hi, lo) -> list[str]:
        """`scope_int` of many addresses (numpy columns: is IPv4, high and low 64 bits), in bulk."""
        import numpy as np

        from agent.enrich.intervals import IntervalIndex

        if self._index is None:
            self._index = IntervalIndex(self._starts[4], self._starts[6])
            self._scope_arr = {v: np.array(x, dtype=object) for v, x in self._scopes.items()}
        idx = self._index.index(v4, hi, lo)
        out = np.where(v4, self._scope_arr[4][np.where(v4, idx, 0)], self._scope_arr[6][np.where(v4, 0, idx)])
        for marker, embedded in ((TEREDO, ~lo), (LOCAL64, lo)):
            rows = np.flatnonzero(out == marker)
            if len(rows):  # the IPv4 address these carry decides
                n4 = embedded[rows] & np.uint64(0xFFFFFFFF)
                out[rows] = self._scope_arr[4][np.searchsorted(self._index.starts4, n4, side="right") - 1]
        return out.tolist()

    def _classify(self, ip: str) -> tuple[str, bool]:
        """(`scope`, `accountable`) of an address from one parse: what the live source asks of
        every event's two addresses (memoised as `classify`)."""
        version, n = ip_int(ip)
        if version == 4:
            return self.scope_int(4, n), True
        return self.scope_int(6, n), self._scopes[6][bisect_right(self._starts[6], n) - 1] not in EMBEDDED_MARKERS

    def accountable(self, ip: str) -> bool:
        """False for Teredo and local-use NAT64 addresses: the kernel's egress counter cannot classify them (see
        `agent.sources.conntrack.kernel_count`), so they are judged but left out of loss accounting."""
        if ":" not in ip:
            return True
        version, n = ip_int(ip)
        return version == 4 or self._scopes[6][bisect_right(self._starts[6], n) - 1] not in EMBEDDED_MARKERS

    def is_local(self, ip: str) -> bool:
        """A source is local (this side of the border) when it is anything but public."""
        return self.scope(ip) != "public"

    def is_egress(self, src: str, dst: str) -> bool:
        return self.scope(dst) == "public" and self.scope(src) != "public"
