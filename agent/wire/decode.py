"""Scalar packet decoder: link layer -> outermost IP header -> transport ports, one packet at a time.

This is the reference and the fallback for the vectorised decoder in `capfile/columns.py`: rare shapes (three
or more VLAN tags, IPv6 extension headers, odd link types) come here. It reads only the fields a
flow needs, with `struct`, and is proven equal to scapy's dissection in tests.

Contract: `decode(linktype, data, wirelen)` returns a `Decoded` (version, proto, src and dst as
16-byte strings, ports, IP-layer length, opener hints) or a status string: "non-ip", "malformed",
"unsupported-link".

Opener hints (`Decoded.hints`, `hints()`): what one packet says about who opened its connection,
as bits that aggregate with OR over a direction: the TCP flags byte (low 8 bits), a SYN without ACK
(HINT_SYN: its sender opened), a SYN-ACK (HINT_SYNACK: its receiver opened), an ICMP/ICMPv6 echo
request or reply, and an ICMP error (its receiver sent what it answers). Only a first fragment
whose header bytes were captured has hints; anything else has 0 (no hint, never malformed).

An ICMP error whose quoted header was captured is decoded as part of the connection it quotes
(`quoted`: that packet's tuple, reversed, with HINT_ICMP_ERROR as its only hint), so a router's
"unreachable" is a packet of the connection it answers, never a connection of its own to the router.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

ETHERNET, NULL, LOOP, RAW, RAW_12, RAW_14, SLL, SLL2, IPV4, IPV6 = 1, 0, 108, 101, 12, 14, 113, 276, 228, 229
LINK_NAMES = {ETHERNET: "ethernet", NULL: "null", LOOP: "loop", RAW: "raw", RAW_12: "raw", RAW_14: "raw",
              SLL: "linux-sll", SLL2: "linux-sll2", IPV4: "ipv4", IPV6: "ipv6"}
SUPPORTED_LINKS = frozenset(LINK_NAMES)
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
ET_IPV4, ET_IPV6 = 0x0800, 0x86DD
AF_INET6_VALUES = (10, 24, 28, 30)  # Linux, BSDs, FreeBSD/Darwin
PORT_PROTOS = (6, 17, 132)  # TCP, UDP, SCTP: first 4 bytes are source and destination port
IPV6_EXT = (0, 43, 60, 51, 135, 139, 140)  # hop-by-hop, routing, dest opts, AH, mobility, HIP, shim6
IPV6_FRAG = 44
V4_PREFIX = b"\x00" * 12

_be16 = struct.Struct(">H").unpack_from
_be32 = struct.Struct(">I").unpack_from
_le32 = struct.Struct("<I").unpack_from


HINT_SYN, HINT_SYNACK, HINT_ECHO_REQUEST, HINT_ECHO_REPLY, HINT_ICMP_ERROR = 0x100, 0x200, 0x400, 0x800, 0x1000
ICMP_ECHO = {1: (8, 0), 58: (128, 129)}  # (request, reply) types
ICMP_ERRORS = {1: (3, 4, 5, 11, 12), 58: (1, 2, 3, 4)}


class Decoded(NamedTuple):
    version: int
    proto: int
    src: bytes  # 16 bytes; IPv4 is 12 zero bytes + the address
    dst: bytes
    sport: int
    dport: int
    iplen: int
    hints: int = 0


def hints(proto: int, data, l4: int, first_fragment: bool = True) -> int:
    """The opener hints of one packet whose transport header starts at `l4` (see the module doc)."""
    n = len(data)
    if not first_fragment:
        return 0
    if proto == 6:
        if n < l4 + 14:
            return 0
        f = data[l4 + 13]
        return f | (HINT_SYN if f & 0x12 == 0x02 else HINT_SYNACK if f & 0x12 == 0x12 else 0)
    if proto in ICMP_ECHO:
        if n < l4 + 1:
            return 0
        kind = data[l4]
        request, reply = ICMP_ECHO[proto]
        return HINT_ECHO_REQUEST if kind == request else HINT_ECHO_REPLY if kind == reply else \
            HINT_ICMP_ERROR if kind in ICMP_ERRORS[proto] else 0
    return 0


def quoted(data, l4: int, version: int) -> tuple[int, bytes, bytes, int, int] | None:
    """The connection an ICMP/ICMPv6 error (header at `l4`) belongs to: the tuple of the packet it
    quotes, reversed (proto, src, sport, dst, dport: the error travels back to that packet's sender,
    as a reply would); None when the quoted header cannot be read (the error keeps its own tuple).
    Ports as `decode` reads them (0 beyond a first fragment, and for other protocols); a quoted
    IPv6 packet with extension headers is not followed."""
    n, q = len(data), l4 + 8
    first = True
    if version == 4:
        if n < q + 20 or data[q] >> 4 != 4:
            return None
        ihl = (data[q] & 0x0F) * 4
        if ihl < 20 or n < q + ihl:
            return None
        proto = data[q + 9]
        first = (_be16(data, q + 6)[0] & 0x1FFF) == 0
        src, dst, ql4 = V4_PREFIX + data[q + 12:q + 16], V4_PREFIX + data[q + 16:q + 20], q + ihl
    else:
        if n < q + 40 or data[q] >> 4 != 6:
            return None
        proto = data[q + 6]
        if proto in IPV6_EXT or proto == IPV6_FRAG:
            return None
        src, dst, ql4 = bytes(data[q + 8:q + 24]), bytes(data[q + 24:q + 40]), q + 40
    sport = dport = 0
    if proto in PORT_PROTOS and first:
        if n < ql4 + 4:
            return None
        sport, dport = _be16(data, ql4)[0], _be16(data, ql4 + 2)[0]
    return proto, bytes(dst), dport, bytes(src), sport


def l3_start(linktype: int, data: bytes) -> tuple[int, int] | str:
    """(offset of the IP header, ethertype-like hint: 4, 6 or 0 for 'read the version nibble')."""
    n = len(data)
    if linktype == ETHERNET:
        if n < 14:
            return "malformed"
        et, off = _be16(data, 12)[0], 14
        while et in VLAN_TPIDS:
            if n < off + 4:
                return "malformed"
            et, off = _be16(data, off + 2)[0], off + 4
        return (off, 4) if et == ET_IPV4 else (off, 6) if et == ET_IPV6 else "non-ip"
    if linktype == SLL:
        if n < 16:
            return "malformed"
        et = _be16(data, 14)[0]
        return (16, 4) if et == ET_IPV4 else (16, 6) if et == ET_IPV6 else "non-ip"
    if linktype == SLL2:
        if n < 20:
            return "malformed"
        et = _be16(data, 0)[0]
        return (20, 4) if et == ET_IPV4 else (20, 6) if et == ET_IPV6 else "non-ip"
    if linktype in (RAW, RAW_12, RAW_14):
        return 0, 0
    if linktype == IPV4:
        return 0, 4
    if linktype == IPV6:
        return 0, 6
    if linktype in (NULL, LOOP):
        if n < 4:
            return "malformed"
        fam = _be32(data, 0)[0] if linktype == LOOP else _le32(data, 0)[0]
        if linktype == NULL and fam > 0xFFFF:  # written on a host of the other byte order
            fam = _be32(data, 0)[0]
        return (4, 4) if fam == 2 else (4, 6) if fam in AF_INET6_VALUES else "non-ip"
    return "unsupported-link"


def decode(linktype: int, data: bytes, wirelen: int | None = None) -> Decoded | str:
    start = l3_start(linktype, data)
    if isinstance(start, str):
        return start
    off, hint = start
    n = len(data)
    wire_avail = (wirelen if wirelen is not None else n) - off
    if n <= off:
        return "malformed"
    version = data[off] >> 4
    if hint and version != hint:
        return "malformed"
    if version == 4:
        if n < off + 20:
            return "malformed"
        ihl = (data[off] & 0x0F) * 4
        total = _be16(data, off + 2)[0]
        if ihl < 20 or total < ihl or total > wire_avail:
            return "malformed"
        proto = data[off + 9]
        src, dst = V4_PREFIX + data[off + 12:off + 16], V4_PREFIX + data[off + 16:off + 20]
        first_fragment = (_be16(data, off + 6)[0] & 0x1FFF) == 0
        l4, iplen = off + ihl, total
    elif version == 6:
        if n < off + 40:
            return "malformed"
        iplen = 40 + _be16(data, off + 4)[0]
        if iplen > wire_avail:
            return "malformed"
        proto = data[off + 6]
        src, dst = bytes(data[off + 8:off + 24]), bytes(data[off + 24:off + 40])
        l4, first_fragment = off + 40, True
        while proto in IPV6_EXT or proto == IPV6_FRAG:
            if n < l4 + 8:
                return "malformed"
            nxt = data[l4]
            if proto == IPV6_FRAG:
                first_fragment = (_be16(data, l4 + 2)[0] & 0xFFF8) == 0
                size = 8
            elif proto == 51:  # AH counts in 4-octet units
                size = (data[l4 + 1] + 2) * 4
            else:
                size = (data[l4 + 1] + 1) * 8
            proto, l4 = nxt, l4 + size
    else:
        return "malformed"
    sport = dport = 0
    if proto in PORT_PROTOS and first_fragment:
        if n < l4 + 4:
            return "malformed"
        sport, dport = _be16(data, l4)[0], _be16(data, l4 + 2)[0]
    h = hints(proto, data, l4, first_fragment)
    if h & HINT_ICMP_ERROR:  # an error belongs to the connection it quotes
        q = quoted(data, l4, version)
        if q is not None:
            return Decoded(version, q[0], q[1], q[3], q[2], q[4], iplen, HINT_ICMP_ERROR)
    return Decoded(version, proto, bytes(src), bytes(dst), sport, dport, iplen, h)


GRE, GTPU_PORT = 47, 2152


def tunnel_inner(linktype: int, data: bytes, wirelen: int | None = None) -> tuple[str, Decoded] | None:
    """The packet a GRE or GTP-U tunnel carries, decoded like any other: ("gre"|"gtp-u", Decoded).

    None when the packet is not such a tunnel, or its inner packet cannot be read. GRE (RFC 2784/2890):
    version 0, checksum/key/sequence fields skipped per flag, protocol type IPv4 or IPv6. GTP-U
    (3GPP TS 29.281) on UDP port 2152: version 1, message type 255 (G-PDU), the optional sequence
    and N-PDU fields and any extension headers skipped.
    """
    outer = decode(linktype, data, wirelen)
    if not isinstance(outer, Decoded):
        return None
    start = l3_start(linktype, data)
    if isinstance(start, str):
        return None
    off = start[0]
    if outer.version == 4:
        l4 = off + (data[off] & 0x0F) * 4
    else:
        l4 = off + 40  # tunnels behind IPv6 extension headers are not followed
        if data[off + 6] != outer.proto:
            return None
    n = len(data)
    if outer.proto == GRE:
        if n < l4 + 4:
            return None
        flags, ptype = _be16(data, l4)[0], _be16(data, l4 + 2)[0]
        if flags & 0x0007 or ptype not in (ET_IPV4, ET_IPV6):
            return None
        inner = l4 + 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
        kind = "gre"
    elif outer.proto == 17 and GTPU_PORT in (outer.sport, outer.dport):
        u = l4 + 8
        if n < u + 8 or data[u] >> 5 != 1 or not data[u] & 0x10 or data[u + 1] != 0xFF:
            return None
        inner = u + 8
        if data[u] & 0x07:  # E, S or PN: sequence (2), N-PDU (1), next extension type (1)
            if n < u + 12:
                return None
            nxt, inner = data[u + 11], u + 12
            while nxt:
                if n < inner + 1 or data[inner] == 0:
                    return None
                size = data[inner] * 4
                if n < inner + size:
                    return None
                nxt, inner = data[inner + size - 1], inner + size
        kind = "gtp-u"
    else:
        return None
    if n <= inner:
        return None
    got = decode(RAW, data[inner:], (wirelen if wirelen is not None else n) - inner)
    return (kind, got) if isinstance(got, Decoded) else None
