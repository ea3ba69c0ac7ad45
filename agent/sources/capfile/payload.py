"""The C walk's state across chunks: its flow table, and the payload passes done during the walk.

The C walk (`_walk.c`) hands over, per chunk, the packets these passes read and nothing else: DNS
responses, QUIC-sized UDP with the long-header bit, the first TCP payload segments of directions
that start a TLS record, and GRE / GTP-U packets. They are fed to the same readers the second walks
use (`names.scan`, `tunnels.tunnel_pass`): `NameExtractor.feed` and `decode.tunnel_inner`. Tests
compare both ways on every capture the names and tunnel tests use.
"""

from __future__ import annotations

import struct

import numpy as np

from agent.names.extract import NameExtractor
from agent.names.packet import transport
from agent.sources.capfile.flows import FlowAccumulator
from agent.sources.capfile.names import DNS_SIZE
from agent.sources.capfile.tunnels import tunnel_tables
from agent.wire import decode as dec

CAND_NAME, CAND_TUNNEL, CAND_TLS_START, CAND_TCP_DATA = 1, 2, 4, 8  # as _walk.c
TLS_KEYS_MAX = 1 << 20


class PayloadPass:
    """One pcap walked in C: `walk_pcap` gets `flow_table` and `tls` on every call and hands its
    candidate packets to `feed`; after the walk, `tunnels()` and `ex` hold what the passes found."""

    def __init__(self, names: bool):
        from agent.sources.capfile._walk import table_new

        self.ex = NameExtractor(dns_size=DNS_SIZE) if names else None
        self.inner = {"gre": FlowAccumulator(), "gtp-u": FlowAccumulator()}
        self.carried = 0
        self.tls = np.zeros(0, dtype=np.uint64)  # key hashes of directions that started a TLS record
        self.flow_table = table_new()  # the walk's flows, kept in C across chunks (no merging per chunk)

    def feed(self, mm, linktype: int, cands: bytes, tls: bytes, queries: bytes = b""):
        """Read a chunk's candidate packets and DNS queries, in capture order. `queries`: records of
        (packet offset i64, time f64, client 16, resolver 16, ports, key length, key), the keys the
        C walk made of the chunk's plain DNS queries (as `dns.question_key`), so no query costs a
        Python parse of its packet."""
        qs = _queries(queries)
        rows = np.frombuffer(cands, dtype=np.int64).reshape(-1, 5)
        if len(tls):
            self.tls = np.union1d(self.tls, np.frombuffer(tls, dtype=np.uint64))
            if len(self.tls) > TLS_KEYS_MAX:
                self.tls = np.frombuffer(tls, dtype=np.uint64).copy()
        if linktype not in dec.SUPPORTED_LINKS:
            return
        view = memoryview(mm)
        ex = self.ex
        qi = 0
        for o, c, w, t, k in zip(rows[:, 0].tolist(), rows[:, 1].tolist(), rows[:, 2].tolist(),
                                 rows[:, 3].view(np.float64).tolist(), rows[:, 4].tolist(), strict=True):
            while qi < len(qs) and qs[qi][0] < o:  # the queries that came before this packet
                if ex is not None:
                    ex.add_query(*qs[qi][2:], qs[qi][1])
                qi += 1
            if k & CAND_TUNNEL:
                got = dec.tunnel_inner(linktype, bytes(view[o:o + c]), w)
                if got is not None:
                    self.inner[got[0]].add_one(got[1], t)
                    self.carried += 1
            if ex is not None and k & (CAND_NAME | CAND_TCP_DATA):
                seg = transport(linktype, view[o:o + c])
                if seg is not None:
                    ex.feed(seg, t)
        if ex is not None:
            for q in qs[qi:]:
                ex.add_query(*q[2:], q[1])

    def tunnels(self, fmt: str, stats) -> list:
        return tunnel_tables(self.inner, self.carried, fmt, stats)


def _queries(blob: bytes) -> list[tuple]:
    """(packet offset, time, client, client port, resolver, resolver port, key) of each record."""
    out, off, n = [], 0, len(blob)
    while off < n:
        pos, ts, src, dst = struct.unpack_from("=qd16s16s", blob, off)
        sport, dport, klen = struct.unpack_from(">HHH", blob, off + 48)
        out.append((pos, ts, src, sport, dst, dport, blob[off + 54:off + 54 + klen]))
        off += 54 + klen
    return out
