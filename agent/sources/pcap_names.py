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
from dataclasses import replace

import numpy as np

from agent.flow import Flow
from agent.names.extract import NameExtractor
from agent.names.packet import transport
from agent.sources import decode as dec
from agent.sources import pcap

FIRST_SEGMENTS = 6  # TCP payload segments per direction per chunk handed to the TLS reader


def _first_per_key(words: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Of the row indices `rows`, the first k of each distinct key (in capture order)."""
    if len(rows) == 0:
        return rows
    with np.errstate(over="ignore"):
        h = (words[rows] * pcap._K).sum(axis=1, dtype=np.uint64)  # the flow table's key hash
    order = np.argsort(h, kind="stable")
    hs = h[order]
    start = np.r_[0, np.flatnonzero(hs[1:] != hs[:-1]) + 1]
    rank = np.arange(len(hs)) - np.repeat(start, np.diff(np.r_[start, len(hs)]))
    return np.sort(rows[order[rank < k]])


def _candidates(status, fields, fallback) -> np.ndarray:
    rows = fallback.copy()
    if fields is None:
        return np.flatnonzero(rows)
    good, words, iplen = fields
    good = good & (status == 0) & ~fallback
    k = words[:, 0]
    proto = (k >> np.uint64(32)) & np.uint64(0xFF)
    sport = (k >> np.uint64(16)) & np.uint64(0xFFFF)
    v4 = (k >> np.uint64(40)) == 4
    ip_hdr = np.where(v4, 20, 40)
    udp = good & (proto == 17)
    dns_resp = udp & ((sport == 53) | (sport == 5353))
    quic_initial = udp & (iplen >= ip_hdr + 8 + 1200)
    tcp_payload = np.flatnonzero(good & (proto == 6) & (iplen > ip_hdr + 20))
    picked = np.flatnonzero(rows | dns_resp | quic_initial)
    tcp_first = _first_per_key(words, tcp_payload, FIRST_SEGMENTS)
    return np.union1d(picked, tcp_first)


def scan(fd: int, fmt: str, path: str, ex: NameExtractor):
    """Feed every packet that can carry a name to `ex`, in capture order."""
    os.lseek(fd, 0, os.SEEK_SET)
    scratch = pcap.CaptureStats(path=path, format=fmt)
    win = pcap._Window(fd, path)
    walker = pcap._walk_pcap(win, scratch, None, use_c=False) if fmt == "pcap" else \
        pcap._walk_pcapng(win, scratch, None)
    for mm, linktype, off, cap, wire, ts, w in walker:
        if linktype not in dec.SUPPORTED_LINKS or off is None:
            continue
        status, fields, fallback = pcap._decode_chunk(np.frombuffer(mm, dtype=np.uint8), linktype, off, cap,
                                                      wire, w)
        rows = _candidates(status, fields, fallback)
        view = memoryview(mm)  # slices without copying; `transport` copies only what it keeps
        feed = ex.feed
        for o, c, t in zip(off[rows].tolist(), cap[rows].tolist(), ts[rows].tolist(), strict=True):
            seg = transport(linktype, view[o:o + c])
            if seg is not None:
                feed(seg, t)


def name_flows(fd: int, fmt: str, stats, flows: list[Flow]) -> list[Flow]:
    if not any(f.proto in (6, 17) for f in flows):
        return flows
    ex = NameExtractor(dns_size=1 << 22)
    scan(fd, fmt, stats.path, ex)
    counts = ex.stats()
    stats.names = {k: v for k, v in sorted(counts.items()) if v}
    for kind, what in (("dns_malformed", "malformed DNS response(s)"),
                       ("tls_malformed", "malformed TLS ClientHello(s)"),
                       ("quic_malformed", "malformed QUIC Initial packet(s)")):
        if counts.get(kind):
            stats.note(kind, "{n} " + what + " skipped; the flows they belong to are judged without that name",
                       count=counts[kind])
    if not (counts.get("dns_responses") or counts.get("tls_hellos") or counts.get("quic_initials")):
        return flows
    out = []
    for f in flows:
        n = ex.name_flow(f.proto, f.src, f.sport, f.dst, f.dport, f.first_seen) if f.proto in (6, 17) else None
        out.append(f if n is None else replace(f, hostname=n.hostname, hostname_source=n.source,
                                               hostname_chain=n.chain))
    return out
