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
from functools import lru_cache

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
    ("64:ff9b:1::/48", "private"),  # local-use IPv4/IPv6 translation
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


def embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form: mapped, nat64, 6to4 or teredo."""
    if addr.ipv4_mapped is not None:
        return "mapped", addr.ipv4_mapped
    if addr in _NAT64:
        return "nat64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIXTOFOUR:
        return "6to4", ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF)
    if addr in _TEREDO:
        return "teredo", ipaddress.IPv4Address(~int(addr) & 0xFFFFFFFF)  # client, obfuscated
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


class Scoper:
    """Scope of an address under a deployment's settings; cached per address."""

    def __init__(self, public_nets=(), local_nets=()):
        self.public_nets = parse_nets(public_nets, "public network")
        self.local_nets = parse_nets(local_nets, "local network")
        self.scope = lru_cache(maxsize=65536)(self._scope)

    def _scope(self, ip: str) -> str:
        addr = ipaddress.ip_address(ip)
        if any(addr in n for n in self.local_nets if n.version == addr.version):
            return "local"
        if any(addr in n for n in self.public_nets if n.version == addr.version):
            return "public"
        if addr.version == 6:
            emb = embedded_ipv4(addr)
            if emb is not None:
                return self._scope(str(emb[1]))
        return registry_scope(addr)

    def is_local(self, ip: str) -> bool:
        """A source is local (this side of the border) when it is anything but public."""
        return self.scope(ip) != "public"

    def is_egress(self, src: str, dst: str) -> bool:
        return self.scope(dst) == "public" and self.scope(src) != "public"
