"""The vectorised header decode of a chunk of capture records (numpy), and the row windows it reads.

Contract: `decode_chunk(buf, linktype, off, cap, wire)` -> (status, fields, fallback) for every
record of one link type; rows in `fallback` (3+ VLAN tags, IPv6 extension headers, IPv4 options
past the window, rarer link types) must go through `agent.wire.decode.decode`, the scalar reference
decoder that tests prove equal to scapy; tests prove this decoder equal to that one.
"""

from __future__ import annotations

import numpy as np

from agent.flowtable import KEY_HASH
from agent.wire import decode as dec

WINDOW = 96  # link header + 2 VLAN tags + IPv4 with options or IPv6 + 4 bytes of ports
_K = KEY_HASH  # the flow key's hash multipliers (the names pass picks rows by the same hash)


def windows(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(N, width) copy of buf[s:s+width] for each start, zero-padded past the end of the buffer.

    One row copy per packet through a strided view, instead of one fancy-index gather per field.
    Bytes past a record's captured length belong to the next record: callers mask by length.
    """
    n = len(buf)
    out = np.zeros((len(starts), width), dtype=np.uint8)
    safe = starts <= n - width
    if n >= width:
        sw = np.lib.stride_tricks.as_strided(buf, shape=(n - width + 1, width), strides=(1, 1), writeable=False)
        out[safe] = sw[starts[safe]]
    for i in np.flatnonzero(~safe).tolist():
        tail = buf[int(starts[i]):int(starts[i]) + width]
        out[i, :len(tail)] = tail
    return out


def _u16(a, b):
    return (a.astype(np.int64) << 8) | b


def decode_chunk(buf: np.ndarray, linktype: int, off, cap, wire, w=None, l4_out: list | None = None):
    """Vectorised decode of one link type. Returns (status, fields, fallback mask).

    status: 0 ok, 1 non-ip, 2 malformed. `fields` = (good mask, key words (N, 5) uint64, IP length,
    opener hints as `agent.wire.decode.hints` gives them).
    Rows in `fallback` must be decoded by `decode.decode` (the reference decoder). `l4_out`, if
    given, receives each row's transport-header offset in the packet (meaningful for good rows).
    """
    n = len(off)
    status = np.zeros(n, dtype=np.int8)
    fallback = np.zeros(n, dtype=bool)
    if linktype not in (dec.ETHERNET, dec.SLL, dec.SLL2, dec.RAW, dec.RAW_12, dec.RAW_14, dec.IPV4, dec.IPV6):
        return status, None, np.ones(n, dtype=bool)  # NULL/LOOP and rarer: scalar path
    if w is None:
        w = windows(buf, off, WINDOW)
    rows = np.arange(n)

    def col(rel, k):
        """Byte at per-row offset rel + k of each window (clipped; callers mask by length)."""
        if isinstance(rel, int):
            return w[:, min(rel + k, WINDOW - 1)]
        return w[rows, np.minimum(rel + k, WINDOW - 1)]

    def col16(rel, k):
        return _u16(col(rel, k), col(rel, k + 1))

    if linktype == dec.ETHERNET:
        status[cap < 14] = 2
        et = _u16(w[:, 12], w[:, 13])
        l3 = 14
        tagged = np.isin(et, dec.VLAN_TPIDS)
        if tagged.any():  # up to two VLAN tags (802.1Q, QinQ) vectorised, more go to the scalar path
            l3 = np.full(n, 14, dtype=np.int64)
            for _ in range(2):
                tagged = np.isin(et, dec.VLAN_TPIDS) & (status == 0)
                status[tagged & (l3 + 4 > cap)] = 2
                et = np.where(tagged, col16(l3, 2), et)
                l3 = np.where(tagged, l3 + 4, l3)
            fallback |= np.isin(et, dec.VLAN_TPIDS) & (status == 0)
    elif linktype in (dec.SLL, dec.SLL2):
        l3 = 16 if linktype == dec.SLL else 20
        status[cap < l3] = 2
        et = _u16(w[:, 14], w[:, 15]) if linktype == dec.SLL else _u16(w[:, 0], w[:, 1])
    else:
        l3 = 0
        et = np.full(n, {dec.IPV4: dec.ET_IPV4, dec.IPV6: dec.ET_IPV6}.get(linktype, 0), dtype=np.int64)
    raw_ip = linktype in (dec.RAW, dec.RAW_12, dec.RAW_14)
    avail = cap - l3
    wire_avail = wire - l3
    b0 = col(l3, 0)
    ver = b0 >> 4
    ok = (status == 0) & ~fallback
    if not raw_ip:
        hint = np.where(et == dec.ET_IPV4, 4, np.where(et == dec.ET_IPV6, 6, 0))
        status[ok & (hint == 0)] = 1
        ok &= hint != 0
        status[ok & ((avail < 1) | (ver != hint))] = 2
    else:
        status[ok & ((avail < 1) | ((ver != 4) & (ver != 6)))] = 2
    ok &= status == 0
    v4 = ok & (ver == 4)
    v6 = ok & (ver == 6)
    ihl = (b0 & 0x0F).astype(np.int64) * 4
    tot4 = col16(l3, 2)
    plen6 = col16(l3, 4) + 40
    bad = (v4 & ((avail < 20) | (ihl < 20) | (tot4 < ihl) | (tot4 > wire_avail))) | \
          (v6 & ((avail < 40) | (plen6 > wire_avail)))
    status[bad] = 2
    v4 &= ~bad
    v6 &= ~bad
    proto = np.where(v4, col(l3, 9), col(l3, 6)).astype(np.int64)
    ext6 = v6 & (np.isin(proto, dec.IPV6_EXT) | (proto == dec.IPV6_FRAG))
    l4 = np.where(v4, l3 + ihl, l3 + 40)
    if l4_out is not None:
        l4_out.append(l4)
    # IPv4 options beyond the window (or a TCP flags byte past it): scalar path
    deep = (v4 | v6) & ((l4 + 4 > WINDOW) | ((proto == 6) & (l4 + 14 > WINDOW)))
    fallback |= ext6 | deep
    v6 &= ~(ext6 | deep)
    v4 &= ~deep
    frag4 = v4 & ((col16(l3, 6) & 0x1FFF) != 0)
    has_ports = (v4 | v6) & np.isin(proto, dec.PORT_PROTOS) & ~frag4
    short = has_ports & (l4 + 4 > cap)
    status[short] = 2
    has_ports &= ~short
    v4 &= ~short
    v6 &= ~short
    good = v4 | v6
    sport = np.where(has_ports, col16(l4, 0), 0)
    dport = np.where(has_ports, col16(l4, 2), 0)
    iplen = np.where(v4, tot4, plen6)
    words = np.zeros((n, 5), dtype=np.uint64)
    words[:, 0] = (np.where(v4, 4, 6).astype(np.uint64) << 40) | (proto.astype(np.uint64) << 32) | \
                  (sport.astype(np.uint64) << 16) | dport.astype(np.uint64)
    # Addresses as big-endian 64-bit words: IPv4 -> (0, addr), IPv6 -> (high, low).
    for rows_mask, first, width in ((v4, 12, 4), (v6, 8, 16)):
        if not rows_mask.any():
            continue
        idx = np.flatnonzero(rows_mask)
        base = (l3 if isinstance(l3, int) else l3[idx])
        for j, start in enumerate((first, first + width)):
            if isinstance(base, int):
                b = w[idx, base + start:base + start + width]
            else:
                b = w[idx[:, None], base[:, None] + start + np.arange(width)]
            b = np.ascontiguousarray(b)
            if width == 4:
                words[idx, 2 + 2 * j] = b.view(">u4").ravel().astype(np.uint64)
            else:
                pair = b.view(">u8").reshape(-1, 2)
                words[idx, 1 + 2 * j] = pair[:, 0]
                words[idx, 2 + 2 * j] = pair[:, 1]
    # Opener hints, as decode.hints: TCP flags (and SYN / SYN-ACK), ICMP echo and error types.
    first_frag = good & ~frag4
    tcp = first_frag & (proto == 6) & (l4 + 14 <= cap)
    flags = np.where(tcp, col(l4, 13), 0).astype(np.int64)
    syn = flags & 0x12
    hints = flags | np.where(tcp & (syn == 0x02), dec.HINT_SYN, 0) | np.where(tcp & (syn == 0x12), dec.HINT_SYNACK, 0)
    icmp = first_frag & ((proto == 1) | (proto == 58)) & (l4 + 1 <= cap)
    if icmp.any():
        kind = col(l4, 0).astype(np.int64)
        v6i = proto == 58
        hints |= np.where(icmp & (kind == np.where(v6i, 128, 8)), dec.HINT_ECHO_REQUEST, 0)
        hints |= np.where(icmp & (kind == np.where(v6i, 129, 0)), dec.HINT_ECHO_REPLY, 0)
        err = np.where(v6i, np.isin(kind, dec.ICMP_ERRORS[58]), np.isin(kind, dec.ICMP_ERRORS[1]))
        hints |= np.where(icmp & err, dec.HINT_ICMP_ERROR, 0)
        # an error takes the tuple of the packet it quotes (decode.quoted): rare, so the scalar path
        fallback |= icmp & err
        good &= ~(icmp & err)
    return status, (good, words, iplen, hints), fallback

