"""The flows GRE and GTP-U packets carry: each tunnel's inner destination is a transfer too.

Contract: `tunnel_pass(fd, fmt, stats)` walks the file a second time (only for captures with GRE or
GTP-U flows) and returns their inner flows as tables sourced `FMT:gre` / `FMT:gtp-u`; with the C
walk, `payload.PayloadPass` collects the same packets during the first walk and calls
`tunnel_tables`. Both use `agent.wire.decode.tunnel_inner`, so both walks give the same flows.
"""

from __future__ import annotations

import os

import numpy as np

from agent.flowtable import FlowTable
from agent.sources.capfile.columns import decode_chunk
from agent.sources.capfile.flows import FlowAccumulator
from agent.sources.capfile.stats import CaptureStats
from agent.sources.capfile.walk import Window, walk
from agent.wire import decode as dec


def tunnel_pass(fd: int, fmt: str, stats: CaptureStats) -> list[FlowTable]:
    """A second walk, only for captures with GRE or GTP-U flows: the flows their packets carry.

    Each tunnel's outer endpoint is already a flow; the inner destination is a transfer too (the
    data goes there). The pass uses the Python walk, so both walk paths give the same flows.
    """
    inner = {"gre": FlowAccumulator(), "gtp-u": FlowAccumulator()}
    scratch = CaptureStats(path=stats.path, format=fmt)
    os.lseek(fd, 0, os.SEEK_SET)  # the first walk read to the end
    win = Window(fd, stats.path)
    walker = walk(win, scratch, fmt, use_c=False)
    carried = 0
    for mm, linktype, off, cap, wire, ts, w in walker:
        if linktype not in dec.SUPPORTED_LINKS or off is None:
            continue
        status, fields, fallback = decode_chunk(np.frombuffer(mm, dtype=np.uint8), linktype, off, cap, wire, w)
        rows = fallback.copy()
        if fields is not None:
            good, words, _, _ = fields
            k = words[:, 0]
            proto, sport, dport = (k >> np.uint64(32)) & np.uint64(0xFF), (k >> np.uint64(16)) & np.uint64(0xFFFF), \
                k & np.uint64(0xFFFF)
            gtpu = (proto == 17) & ((sport == dec.GTPU_PORT) | (dport == dec.GTPU_PORT))
            rows |= good & (status == 0) & ((proto == dec.GRE) | gtpu)
        for i in np.flatnonzero(rows).tolist():
            o, c = int(off[i]), int(cap[i])
            got = dec.tunnel_inner(linktype, bytes(mm[o:o + c]), int(wire[i]))
            if got is not None:
                inner[got[0]].add_one(got[1], float(ts[i]))
                carried += 1
    return tunnel_tables(inner, carried, fmt, stats)


def tunnel_tables(inner: dict, carried: int, fmt: str, stats: CaptureStats) -> list[FlowTable]:
    if carried:
        stats.note("tunnels", "{n} packet(s) in GRE or GTP-U tunnels: the flows they carry are judged too "
                              "(source " + fmt + ":gre / " + fmt + ":gtp-u)", count=carried)
    return [t.table(f"{fmt}:{kind}") for kind, t in inner.items()]

