"""One packet -> the transport slice name extraction reads: addresses, ports, TCP sequence, payload.

Contract: `transport(linktype, data)` returns a `Segment` or None (not IP, not TCP/UDP, a
non-first fragment, or malformed: the caller counts those as it likes). Addresses are 16-byte
strings as in `agent.wire.decode` (IPv4 is 12 zero bytes + the address), so both modules key
flows the same way. The payload is cut at the IP total length (Ethernet padding is not payload)
and at what was captured.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from agent.wire import decode as dec

_be16 = struct.Struct(">H").unpack_from
_be32 = struct.Struct(">I").unpack_from
TCP, UDP = 6, 17


class Segment(NamedTuple):
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int  # TCP sequence number of the first payload byte; 0 for UDP
    flags: int  # TCP flags; 0 for UDP
    payload: bytes


def transport(linktype: int, data: bytes) -> Segment | None:
    start = dec.l3_start(linktype, data)
    if isinstance(start, str):
        return None
    return ip_transport(data, start[0])


def ip_transport(data: bytes, off: int) -> Segment | None:
    """The TCP or UDP segment in the IP packet at data[off:]."""
    n = len(data)
    if n < off + 20:
        return None
    version = data[off] >> 4
    if version == 4:
        ihl = (data[off] & 0x0F) * 4
        total = _be16(data, off + 2)[0]
        if ihl < 20 or total < ihl or _be16(data, off + 6)[0] & 0x3FFF:  # fragments carry no whole message
            return None
        proto = data[off + 9]
        src, dst = dec.V4_PREFIX + data[off + 12:off + 16], dec.V4_PREFIX + data[off + 16:off + 20]
        l4, end = off + ihl, min(n, off + total)
    elif version == 6:
        if n < off + 40:
            return None
        proto = data[off + 6]
        src, dst = data[off + 8:off + 24], data[off + 24:off + 40]
        l4, end = off + 40, min(n, off + 40 + _be16(data, off + 4)[0])
        while proto in dec.IPV6_EXT:
            if end < l4 + 8:
                return None
            size = (data[l4 + 1] + 2) * 4 if proto == 51 else (data[l4 + 1] + 1) * 8
            proto, l4 = data[l4], l4 + size
        if proto == dec.IPV6_FRAG:
            return None
    else:
        return None
    if proto == TCP:
        if end < l4 + 20:
            return None
        hl = (data[l4 + 12] >> 4) * 4
        if hl < 20 or end < l4 + hl:
            return None
        sport, dport, seq = _be16(data, l4)[0], _be16(data, l4 + 2)[0], _be32(data, l4 + 4)[0]
        return Segment(TCP, bytes(src), bytes(dst), sport, dport, seq, data[l4 + 13], bytes(data[l4 + hl:end]))
    if proto == UDP:
        if end < l4 + 8:
            return None
        return Segment(UDP, bytes(src), bytes(dst), _be16(data, l4)[0], _be16(data, l4 + 2)[0], 0, 0,
                       bytes(data[l4 + 8:end]))
    return None
