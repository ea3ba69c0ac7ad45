"""pcap and pcapng files -> aggregated flows, fast, in bounded memory: the capture reader's entry.

Why by hand: scapy dissects ~6 kpps and dpkt ~80 kpps here; an audit of a real capture needs
millions. The file is read in large segments (`walk.Window`); a short loop (C, or Python) only walks
record boundaries, then numpy gathers the handful of header fields for a whole chunk at once
(`columns.decode_chunk`). Packets whose shape the vectorised path does not cover (3+ VLAN tags,
IPv6 extension headers, BSD loopback) go through the scalar reference decoder in
`agent.wire.decode`, which tests prove equal to scapy. Memory stays flat: one segment is held at a time.

Contract: `read_capture(path)` -> `Capture` with `flows` (one per distinct (proto, src, sport,
dst, dport); bytes are IP-layer octets) and `stats` (format, link types, packets, malformed,
non-IP, truncated + offset, warnings). Format is detected by magic number, never by name.
Raises UserError for files that are not captures.
"""

from __future__ import annotations

import os

import numpy as np

from agent.errors import UserError
from agent.fileio import open_regular
from agent.flow import Flow
from agent.flowtable import FlowTable, concat
from agent.sources.capfile import walk as _walk
from agent.sources.capfile.columns import decode_chunk
from agent.sources.capfile.flows import FlowAccumulator
from agent.sources.capfile.stats import CaptureStats, sniff_format
from agent.sources.capfile.tunnels import tunnel_pass
from agent.sources.capfile.walk import Window
from agent.wire import decode as dec

try:
    from agent.sources.capfile._walk import table_dump as _c_table_dump
except ImportError:  # pragma: no cover - depends on the build
    _c_table_dump = None

__all__ = ["Capture", "CaptureStats", "read_capture", "sniff_format"]


class Capture:
    """What a capture holds: its stats and its flows, as columns (`table`) or records (`flows`)."""

    def __init__(self, stats: CaptureStats, table: FlowTable):
        self.stats, self.table = stats, table
        self._flows: list[Flow] | None = None

    @property
    def flows(self) -> list[Flow]:
        if self._flows is None:
            self._flows = self.table.flows()
        return self._flows


def read_capture(path: str, progress=None, names: bool = True) -> Capture:
    fd, st = open_regular(path, "capture")
    try:
        if st.st_size == 0:
            raise UserError(f"{path}: empty file, not a capture")
        try:
            head = os.pread(fd, 64, 0)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        fmt = sniff_format(head)
        if fmt not in ("pcap", "pcapng"):
            raise UserError(f"{path}: not a pcap or pcapng file (first bytes {head[:8].hex()})")
        if fmt == "pcapng" and (len(head) < 12 or head[8:12] not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d")):
            raise UserError(f"{path}: byte offset 8: bad pcapng byte-order magic")
        stats = CaptureStats(path=path, format=fmt)
        win = Window(fd, path)
        payload = None
        if fmt == "pcap" and _walk.c_walk_available():
            from agent.sources.capfile.payload import PayloadPass

            payload = PayloadPass(names)
        walker = _walk.walk(win, stats, fmt, progress, payload=payload)
        flows = FlowAccumulator()
        for mm, linktype, off, cap, wire, ts, w in walker:
            consume(np.frombuffer(mm, dtype=np.uint8), mm, stats, flows, linktype, off, cap, wire, ts, w)
        read = win.base + len(win.data)
        if read < st.st_size:
            # The file shrank under us (copytruncate): what was read is audited, the rest is gone.
            stats.truncated = True
            stats.truncated_offset = read if stats.truncated_offset is None else stats.truncated_offset
            stats.warnings.append(f"{path}: the file shrank from {st.st_size:,} to {read:,} bytes while being read; "
                                  "audited what was read")
        if payload is not None:
            words, pk, by, first, last, hints, parts = _c_table_dump(payload.flow_table)
            if words:
                flows.add_groups(np.frombuffer(words, dtype=np.uint64).reshape(-1, 5),
                                 np.frombuffer(pk, dtype=np.int64), np.frombuffer(by, dtype=np.int64),
                                 np.frombuffer(first), np.frombuffer(last), np.frombuffer(hints, dtype=np.int64),
                                 distinct=parts == 0)
        outer = flows.table(fmt)
        if payload is not None and stats.name_candidates is not None:
            # the C walk handed over every packet the payload passes read: no second walk
            outer = concat([outer, *payload.tunnels(fmt, stats)])
            if names:
                from agent.sources.capfile.names import apply_names

                apply_names(payload.ex, stats, outer)
        else:
            if len(outer) and ((outer.proto == dec.GRE) | ((outer.proto == 17) & ((outer.sport == dec.GTPU_PORT) | (
                    outer.dport == dec.GTPU_PORT)))).any():
                outer = concat([outer, *tunnel_pass(fd, fmt, stats)])
            if names:
                from agent.sources.capfile.names import name_flows

                name_flows(fd, fmt, stats, outer)
        stats.finish()
        return Capture(stats, outer)
    finally:
        os.close(fd)


def consume(buf, mm, stats, flows: FlowAccumulator, linktype, off, cap, wire, ts, win):
    if isinstance(win, tuple):  # walked, decoded and grouped by the C accelerator
        (words, pk, by, first, last, hints), counts, _ = win
        records, ip_packets, ip_bytes, non_ip, malformed, unsupported, named = counts
        if stats.name_candidates is not None:
            stats.name_candidates += named
        stats.packets += records
        if words:  # nothing when the walk keeps its flow table across chunks (PayloadPass.flow_table)
            flows.add_groups(np.frombuffer(words, dtype=np.uint64).reshape(-1, 5), np.frombuffer(pk, dtype=np.int64),
                             np.frombuffer(by, dtype=np.int64), np.frombuffer(first), np.frombuffer(last),
                             np.frombuffer(hints, dtype=np.int64))
        stats.ip_packets += ip_packets
        stats.bytes += ip_bytes
        stats.non_ip += non_ip
        stats.malformed += malformed
        if unsupported:
            stats.unsupported += unsupported
            stats.note(f"link-{linktype}", f"link type {linktype} is not supported; {{n}} packet(s) skipped",
                       count=unsupported)
        return
    n = len(off)
    stats.packets += n
    stats.name_candidates = None  # only the C walk counts them
    if linktype not in dec.SUPPORTED_LINKS:
        stats.unsupported += n
        stats.note(f"link-{linktype}", f"link type {linktype} is not supported; {{n}} packet(s) skipped", count=n)
        return
    status, fields, fallback = decode_chunk(buf, linktype, off, cap, wire, win)
    if fields is not None:
        good, words, iplen, hints = fields
        good = good & ~fallback & (status == 0)
        flows.add_keys(words[good], iplen[good], ts[good], hints[good])
        stats.ip_packets += int(good.sum())
        stats.bytes += int(iplen[good].sum())
        stats.non_ip += int(((status == 1) & ~fallback).sum())
        stats.malformed += int(((status == 2) & ~fallback).sum())
    for i in np.flatnonzero(fallback).tolist():
        o, c = int(off[i]), int(cap[i])
        d = dec.decode(linktype, mm[o:o + c], int(wire[i]))
        if isinstance(d, dec.Decoded):
            flows.add_one(d, float(ts[i]))
            stats.ip_packets += 1
            stats.bytes += d.iplen
        elif d == "non-ip":
            stats.non_ip += 1
        else:
            stats.malformed += 1
