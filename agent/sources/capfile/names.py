"""The names pass over a capture: DNS answers, TLS and QUIC hellos -> hostnames on its flows.

A second walk of the file (as for tunnels), after the flows are counted. numpy picks the packets
that can carry a name, so Python only touches those: DNS responses (UDP from port 53/5353), UDP
datagrams large enough to be a client's QUIC Initial, and the first few TCP segments with payload
of each direction of each flow in a chunk (a ClientHello is the client's first bytes; a few
segments cover one split over several). Everything else is skipped without a Python object.

Contract: `name_flows(fd, fmt, stats, flows)` returns the flows with `hostname`,
`hostname_source` and (for DNS) `hostname_chain` set where the capture shows a name, and records
what it read in `stats.names` (DNS responses, hellos, malformed packets by kind).
"""

from __future__ import annotations

import os

import numpy as np

from agent.flowtable import KEY_HASH, FlowTable, object_column
from agent.names.extract import NameExtractor
from agent.names.packet import transport
from agent.sources.capfile.columns import decode_chunk
from agent.sources.capfile.stats import CaptureStats
from agent.sources.capfile.walk import Window, walk
from agent.wire import decode as dec

FIRST_SEGMENTS = 6  # TCP payload segments per direction per chunk handed to the TLS reader (as _walk.c)
DNS_SIZE = 1 << 22  # answers the capture's cache keeps


def _first_per_key(words: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Of the row indices `rows`, the first k of each distinct key (in capture order)."""
    if len(rows) == 0:
        return rows
    with np.errstate(over="ignore"):
        h = (words[rows] * KEY_HASH).sum(axis=1, dtype=np.uint64)  # the flow table's key hash
    order = np.argsort(h, kind="stable")
    hs = h[order]
    start = np.r_[0, np.flatnonzero(hs[1:] != hs[:-1]) + 1]
    rank = np.arange(len(hs)) - np.repeat(start, np.diff(np.r_[start, len(hs)]))
    return np.sort(rows[order[rank < k]])


def _byte_at(buf: np.ndarray, off, cap, pos) -> np.ndarray:
    """The packet byte at per-row position `pos`, or -1 where the record does not hold it."""
    out = np.full(len(pos), -1, dtype=np.int64)
    ok = (pos >= 0) & (pos < cap)
    out[ok] = buf[off[ok] + pos[ok]]
    return out


class _Candidates:
    """Which packets of a chunk can carry a name, chosen with numpy.

    DNS responses and queries, UDP datagrams of client-Initial size whose first byte has the QUIC long-header
    bit, and the first FIRST_SEGMENTS TCP payload segments of each direction of a flow when one of
    them starts a TLS handshake record (0x16), or when an earlier chunk did (a ClientHello split
    across chunks). A stream whose first segments hold no handshake record carries no ClientHello,
    so skipping it loses no name, and a bulk transfer costs no Python per packet.
    """

    SEEN_MAX = 1 << 20

    def __init__(self):
        self.tls_keys = np.zeros(0, dtype=np.uint64)  # key hashes of directions that started a handshake

    def __call__(self, buf, off, cap, status, fields, fallback, l4) -> np.ndarray:
        rows = fallback.copy()
        if fields is None:
            return np.flatnonzero(rows)
        good, words, iplen, _hints = fields
        good = good & (status == 0) & ~fallback
        k = words[:, 0]
        proto = (k >> np.uint64(32)) & np.uint64(0xFF)
        sport = (k >> np.uint64(16)) & np.uint64(0xFFFF)
        v4 = (k >> np.uint64(40)) == 4
        ip_hdr = np.where(v4, 20, 40)
        udp = good & (proto == 17)
        dport = k & np.uint64(0xFFFF)
        dns = udp & ((sport == 53) | (sport == 5353) | (dport == 53) | (dport == 5353))  # answers and their queries
        quic = udp & (iplen >= ip_hdr + 8 + 1200)
        if quic.any():
            quic &= (_byte_at(buf, off, cap, l4 + 8) & 0x80) != 0
        tcp = good & (proto == 6)
        thl = (_byte_at(buf, off, cap, l4 + 12) >> 4) * 4
        tcp_payload = np.flatnonzero(tcp & (thl >= 20) & (iplen > ip_hdr + thl))  # the reader drops thl < 20
        picked = np.flatnonzero(rows | dns | quic)
        first = _first_per_key(words, tcp_payload, FIRST_SEGMENTS)
        if len(first):
            with np.errstate(over="ignore"):
                h = (words[first] * KEY_HASH).sum(axis=1, dtype=np.uint64)
            b0 = _byte_at(buf, off[first], cap[first], l4[first] + thl[first])
            # -1: the payload is not captured; kept, the reader decides
            starts = np.unique(h[(b0 == 0x16) | (b0 < 0)])
            if len(starts):
                self.tls_keys = np.union1d(self.tls_keys, starts)
                if len(self.tls_keys) > self.SEEN_MAX:
                    self.tls_keys = starts
            first = first[np.isin(h, self.tls_keys)]
        return np.union1d(picked, first)


def scan(fd: int, fmt: str, path: str, ex: NameExtractor):
    """Feed every packet that can carry a name to `ex`, in capture order."""
    os.lseek(fd, 0, os.SEEK_SET)
    scratch = CaptureStats(path=path, format=fmt)
    win = Window(fd, path)
    walker = walk(win, scratch, fmt, use_c=False)
    pick = _Candidates()
    for mm, linktype, off, cap, wire, ts, w in walker:
        if linktype not in dec.SUPPORTED_LINKS or off is None:
            continue
        buf = np.frombuffer(mm, dtype=np.uint8)
        l4: list = []
        status, fields, fallback = decode_chunk(buf, linktype, off, cap, wire, w, l4_out=l4)
        rows = pick(buf, off, cap, status, fields, fallback, l4[0] if l4 else None)
        view = memoryview(mm)  # slices without copying; `transport` copies only what it keeps
        feed = ex.feed
        for o, c, t in zip(off[rows].tolist(), cap[rows].tolist(), ts[rows].tolist(), strict=True):
            seg = transport(linktype, view[o:o + c])
            if seg is not None:
                feed(seg, t)


def name_flows(fd: int, fmt: str, stats, table: FlowTable) -> None:
    """Set the host-name columns of `table` (a capture's flows) from the names the capture shows."""
    tcp_udp = np.flatnonzero((table.proto == 6) | (table.proto == 17))
    if not len(tcp_udp):
        return
    ex = NameExtractor(dns_size=DNS_SIZE)
    scan(fd, fmt, stats.path, ex)
    apply_names(ex, stats, table)


def apply_names(ex: NameExtractor, stats, table: FlowTable) -> None:
    """Set the host-name columns of `table` from what `ex` has read of the capture."""
    tcp_udp = np.flatnonzero((table.proto == 6) | (table.proto == 17))
    counts = ex.stats()
    stats.names = {k: v for k, v in sorted(counts.items()) if v}
    for kind, what in (("dns_malformed", "malformed DNS response(s)"),
                       ("tls_malformed", "malformed TLS ClientHello(s)"),
                       ("quic_malformed", "malformed QUIC Initial packet(s)")):
        if counts.get(kind):
            stats.note(kind, "{n} " + what + " skipped; the flows they belong to are judged without that name",
                       count=counts[kind])
    if not (counts.get("dns_responses") or counts.get("tls_hellos") or counts.get("quic_initials")):
        return
    src, dst = table.src, table.dst
    names = [None] * len(table)
    found = False
    for i, proto, sport, dport, first in zip(tcp_udp.tolist(), table.proto[tcp_udp].tolist(),
                                             table.sport[tcp_udp].tolist(), table.dport[tcp_udp].tolist(),
                                             table.first[tcp_udp].tolist(), strict=True):
        n = ex.name_flow(proto, src.text[src.inverse[i]], sport, dst.text[dst.inverse[i]], dport, first)
        if n is not None:
            names[i] = n
            found = True
    if found:
        table.hostname = object_column([n.hostname if n else None for n in names])
        table.hostname_source = object_column([n.source if n else None for n in names])
        table.hostname_chain = object_column([n.chain if n else () for n in names])
