"""Connections, not packet directions: one-way flows paired into one record per connection, oriented
from the side that opened it.

Contract: `connections(table)` takes a FlowTable of one-way flows (a capture's, or a flow log's
lines) and gives one row per connection: `src`/`sport` is the opener, `dst`/`dport` the responder;
`packets`/`bytes`/`hints` are what the opener sent, `packets_reply`/`bytes_reply`/`hints_reply` what
the responder sent; first/last seen span both directions; `opened` is the index in OPENED_BY of how
the opener is known. One-way flows are one connection when their 5-tuples are the same or one is
the other's reversed (and they come from the same source), unless their times show the 5-tuple
idle for longer than its timeout (`flowtable.IDLE_TCP`, `IDLE_OTHER`: Zeek's 5 and 1 minutes)
between them: then each busy stretch is a connection of its own. So a flow log with a line per
interval gives one connection for a busy 5-tuple, and a port reused an hour later gives two. Rows that
already know their opener (`opened` set, or a conntrack record: the kernel's original direction)
are kept as they are. Every source goes through this one function: the C walk, the Python walk,
pcapng and flow logs all hand it the same one-way table.

Who opened it, in this order (Zeek's and tshark's rules, stated so they can be checked):
- TCP `syn`: the sender of a SYN without ACK; `syn-ack`: the receiver of a SYN-ACK whose SYN the
  capture missed.
- ICMP/ICMPv6 `icmp-echo`: the sender of an echo request (the receiver of a reply);
  `icmp-error`: an error's receiver sent what the error answers. The decoders put an error whose
  quoted header was captured into the connection it quotes (`wire.decode.quoted`: a packet from the
  quoted destination's side, so a router's "unreachable" is never a connection to the router);
  one whose quote was cut off stays an ICMP connection of its own, opened by its receiver.
- TCP, UDP, SCTP without those, `port`: a service port (below 1024, or a registered server port
  in SERVICE_PORTS) against an ephemeral one: the ephemeral side opened. A datagram from port 53,
  123 or 443 is an answer.
- Otherwise `first-packet`: the sender of the connection's first packet (earliest first-seen).
"""

from __future__ import annotations

import numpy as np

from agent.flow import OPENED_BY
from agent.flow import OPENED_CODE as CODE
from agent.flowtable import FlowTable, concat, first_rows, group_words, idle_timeouts, object_column, split_idle
from agent.wire.decode import HINT_ECHO_REPLY, HINT_ECHO_REQUEST, HINT_ICMP_ERROR, HINT_SYN, HINT_SYNACK

__all__ = ["OPENED_BY", "connections", "service_port"]
# Registered server ports above 1023 that clients do not pick as their own (IANA / Zeek's
# likely_server_ports, trimmed to what egress commonly meets).
SERVICE_PORTS = np.array(sorted({1080, 1194, 1433, 1521, 1701, 1723, 1812, 1813, 1883, 2049, 2375, 2376, 2379, 3128,
                                 3268, 3269, 3306, 3389, 3478, 4500, 5060, 5061, 5222, 5223, 5228, 5349, 5432, 5671,
                                 5672, 5900, 5938, 6379, 6443, 6660, 6667, 6697, 8000, 8008, 8080, 8081, 8088, 8443,
                                 8883, 8888, 9000, 9092, 9093, 9200, 9300, 9418, 9443, 10250, 11211, 19302, 27017}),
                         dtype=np.int64)
PORT_PROTOS = (6, 17, 132)
ICMP_PROTOS = (1, 58)
def service_port(ports: np.ndarray) -> np.ndarray:
    return (ports < 1024) | np.isin(ports, SERVICE_PORTS)


def _pair_key(t: FlowTable, src_ids: np.ndarray | None):
    """Per row: whether its source is the lower endpoint, and five key words that name its
    connection whichever way it points: (v4 << 63 | source id << 40 | proto << 32 | lower port << 16
    | higher port, lower address hi, lo, higher address hi, lo)."""
    s_v4, s_hi, s_lo, d_v4, d_hi, d_lo = t.src_v4, t.src_hi, t.src_lo, t.dst_v4, t.dst_hi, t.dst_lo
    sp, dp = t.sport, t.dport
    # (v4, hi, lo, port) of the source against the destination's, lexicographically
    lower = (s_v4 > d_v4) | ((s_v4 == d_v4) & ((s_hi < d_hi) | ((s_hi == d_hi) & (
        (s_lo < d_lo) | ((s_lo == d_lo) & (sp <= dp))))))
    u = np.uint64
    w0 = (np.where(lower, s_v4, d_v4).astype(u) << u(63)) | (t.proto.astype(u) << u(32)) | \
        (np.where(lower, sp, dp).astype(u) << u(16)) | np.where(lower, dp, sp).astype(u)
    if src_ids is not None:
        w0 |= src_ids.astype(u) << u(40)
    words = np.stack([w0, np.where(lower, s_hi, d_hi), np.where(lower, s_lo, d_lo), np.where(lower, d_hi, s_hi),
                      np.where(lower, d_lo, s_lo)], axis=1)
    return lower, words


def _source_ids(t: FlowTable) -> tuple[np.ndarray | None, int]:
    """(each row's source as a small integer, the id of "conntrack" or -1); (None, -1) for one source."""
    if isinstance(t.source, str):
        return None, -1
    ids: dict = {}
    col = np.fromiter((ids.setdefault(s, len(ids)) for s in t.source), dtype=np.int64, count=len(t))
    return col, ids.get("conntrack", -1)


def connections(t: FlowTable) -> FlowTable:
    n = len(t)
    known = t.opened > 0 if t.opened is not None else np.zeros(n, dtype=bool)
    src_ids, conntrack = _source_ids(t)  # one pass over the per-row sources, for both uses
    if src_ids is not None:
        known = known | (src_ids == conntrack)
    elif t.source == "conntrack":
        known = np.ones(n, dtype=bool)
    todo = np.flatnonzero(~known)
    if not len(todo):
        return _as_connections(t)
    if src_ids is not None and src_ids.max(initial=0) >= 1 << 23:  # more sources than the key holds (never seen)
        src_ids = None
    lower, words = _pair_key(t.take(todo) if len(todo) < n else t, src_ids[todo] if src_ids is not None and
                             len(todo) < n else src_ids)
    low = lower
    rep, group = group_words(words)  # rep: a row of each group
    g = len(rep)
    # a 5-tuple used again after its idle timeout is a new connection: cut groups at idle gaps
    first, last = t.first[todo], t.last[todo]
    timeout = idle_timeouts(t.proto[todo[rep]])
    g_first, g_last = np.full(g, np.inf), np.full(g, -np.inf)
    np.minimum.at(g_first, group, first)
    np.maximum.at(g_last, group, last)
    maybe = (g_last - g_first) > timeout
    if maybe.any():
        group, g = split_idle(group, g, first, last, timeout[group], maybe)
        rep = first_rows(group, g)
    return _paired(t, known, todo, group, g, low, rep)


def _paired(t: FlowTable, known, todo, group, g, low, rep) -> FlowTable:
    """Build the connection table: the known rows as they are, then one row per group of `todo`."""
    rows = todo
    pk, by, hints, first = t.packets[rows], t.bytes[rows], t.hints_or_zero()[rows], t.first[rows]
    # per group: what the lower endpoint (A) sent and what the higher (B) sent
    pa = np.bincount(group, weights=np.where(low, pk, 0), minlength=g).astype(np.int64)
    pb = np.bincount(group, weights=np.where(low, 0, pk), minlength=g).astype(np.int64)
    ba = np.bincount(group, weights=np.where(low, by, 0), minlength=g).astype(np.int64)
    bb = np.bincount(group, weights=np.where(low, 0, by), minlength=g).astype(np.int64)
    ha, hb = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
    np.bitwise_or.at(ha, group[low], hints[low])
    np.bitwise_or.at(hb, group[~low], hints[~low])
    fa, fb = np.full(g, np.inf), np.full(g, np.inf)
    np.minimum.at(fa, group[low], first[low])
    np.minimum.at(fb, group[~low], first[~low])
    first_g = np.minimum(fa, fb)
    last_g = np.full(g, -np.inf)
    np.maximum.at(last_g, group, t.last[rows])
    # the representative row of each group names its endpoints A (lower) and B (higher)
    r = rows[rep]
    rl = low[rep]
    proto, sport, dport = t.proto[r], t.sport[r], t.dport[r]
    a_port, b_port = np.where(rl, sport, dport), np.where(rl, dport, sport)
    opener_a, how = _who_opened(proto, a_port, b_port, ha, hb, fa, fb)
    # orient: the opener is the source
    src_is_rep_src = opener_a == rl  # the representative row's source is the opener
    pick = lambda x, y: np.where(src_is_rep_src, x, y)  # noqa: E731
    out = {
        "proto": proto, "sport": pick(sport, dport), "dport": pick(dport, sport),
        "src_v4": pick(t.src_v4[r], t.dst_v4[r]), "src_hi": pick(t.src_hi[r], t.dst_hi[r]),
        "src_lo": pick(t.src_lo[r], t.dst_lo[r]), "dst_v4": pick(t.dst_v4[r], t.src_v4[r]),
        "dst_hi": pick(t.dst_hi[r], t.src_hi[r]), "dst_lo": pick(t.dst_lo[r], t.src_lo[r]),
        "packets": np.where(opener_a, pa, pb), "bytes": np.where(opener_a, ba, bb),
        "packets_reply": np.where(opener_a, pb, pa), "bytes_reply": np.where(opener_a, bb, ba),
        "hints": np.where(opener_a, ha, hb), "hints_reply": np.where(opener_a, hb, ha),
        "first": first_g, "last": last_g, "opened": how,
    }
    # object columns: from the opener's row where it has a host name (else the other row's), the
    # name's source and chain with it; the process from the opener's row, else the other's
    idx = np.arange(len(rows))
    from_opener = low == opener_a[group]
    opener_row, other_row = np.full(g, -1, dtype=np.int64), np.full(g, -1, dtype=np.int64)
    opener_row[group[from_opener]] = idx[from_opener]
    other_row[group[~from_opener]] = idx[~from_opener]
    obj = {}
    host = t.hostname[rows] if t.hostname is not None else None
    if host is not None:
        has = np.array([h is not None for h in host.tolist()], dtype=bool)
        name_row = np.where((opener_row >= 0) & has[np.maximum(opener_row, 0)], opener_row, other_row)
        name_row = np.where(name_row >= 0, name_row, opener_row)
        for name in ("hostname", "hostname_source", "hostname_chain"):
            col = getattr(t, name)
            vals = col[rows].tolist() if col is not None else None
            obj[name] = None if vals is None else \
                [vals[i] if i >= 0 else (() if name == "hostname_chain" else None) for i in name_row.tolist()]
    if t.who is not None:
        who = t.who[rows].tolist()
        obj["who"] = [who[i] if i >= 0 and who[i] is not None else (who[j] if j >= 0 else None)
                      for i, j in zip(opener_row.tolist(), other_row.tolist(), strict=True)]
    source = t.source if isinstance(t.source, str) else [t.source[i] for i in r.tolist()]
    paired = _table(out, source, obj)
    if not known.any():
        return paired
    return concat([_as_connections(t.take(np.flatnonzero(known))), paired])


def _who_opened(proto, a_port, b_port, ha, hb, fa, fb):
    """(A opened?, OPENED_BY code) per connection; A is the lower endpoint, B the higher."""
    g = len(proto)
    a_open = np.zeros(g, dtype=bool)
    how = np.zeros(g, dtype=np.int8)

    def decide(mask, a_value, code):
        nonlocal a_open, how
        m = mask & (how == 0)
        a_open = np.where(m, a_value, a_open)
        how = np.where(m, CODE[code], how).astype(np.int8)

    tcp = proto == 6
    sa, sb = (ha & HINT_SYN) != 0, (hb & HINT_SYN) != 0
    decide(tcp & sa & sb, fa <= fb, "syn")  # a simultaneous open: the earlier SYN
    decide(tcp & sa, True, "syn")
    decide(tcp & sb, False, "syn")
    decide(tcp & ((hb & HINT_SYNACK) != 0), True, "syn-ack")  # B answered A's SYN
    decide(tcp & ((ha & HINT_SYNACK) != 0), False, "syn-ack")
    icmp = np.isin(proto, ICMP_PROTOS)
    decide(icmp & ((ha & HINT_ECHO_REQUEST) != 0), True, "icmp-echo")
    decide(icmp & ((hb & HINT_ECHO_REQUEST) != 0), False, "icmp-echo")
    decide(icmp & ((hb & HINT_ECHO_REPLY) != 0), True, "icmp-echo")
    decide(icmp & ((ha & HINT_ECHO_REPLY) != 0), False, "icmp-echo")
    # an error (ICMP, or one decoded into the connection it quotes) from B's side answers what A sent
    decide((hb & HINT_ICMP_ERROR) != 0, True, "icmp-error")
    decide((ha & HINT_ICMP_ERROR) != 0, False, "icmp-error")
    ports = np.isin(proto, PORT_PROTOS)
    sa_, sb_ = service_port(a_port), service_port(b_port)
    decide(ports & sb_ & ~sa_, True, "port")  # B serves: A opened
    decide(ports & sa_ & ~sb_, False, "port")
    decide(np.ones(g, dtype=bool), fa <= fb, "first-packet")
    return a_open, how


def _table(cols: dict, source, obj: dict) -> FlowTable:
    return FlowTable(cols["proto"], cols["sport"], cols["dport"], cols["src_v4"], cols["src_hi"], cols["src_lo"],
                     cols["dst_v4"], cols["dst_hi"], cols["dst_lo"], cols["packets"], cols["bytes"], cols["first"],
                     cols["last"], source, **{k: (None if v is None else _objects(v)) for k, v in obj.items()},
                     hints=cols["hints"], hints_reply=cols["hints_reply"], packets_reply=cols["packets_reply"],
                     bytes_reply=cols["bytes_reply"], opened=cols["opened"])


def _objects(values: list) -> np.ndarray:
    return object_column(values)


def _as_connections(t: FlowTable) -> FlowTable:
    """Rows that already are connections, with the connection columns filled where they lack them:
    a conntrack record's opener is the kernel's original direction."""
    n = len(t)
    z = np.zeros(n, dtype=np.int64)
    if t.opened is None or (t.opened == 0).any():
        opened = np.where(t.opened > 0, t.opened, CODE["conntrack"]) if t.opened is not None else \
            np.full(n, CODE["conntrack"], dtype=np.int8)
        t.opened = opened.astype(np.int8)
    for name in ("hints", "hints_reply", "packets_reply", "bytes_reply"):
        if getattr(t, name) is None:
            setattr(t, name, z)
    return t
