"""The collector's connection table: flow records in, connections' items out.

Contract (both twins: `ConnTable` here, the reference, and `_conntab.Table`, its C twin where
built; `make_table` picks):

- `feed(groups, items) -> tally`: one read round's records, `groups` a list of (records, site,
  scoper index or -1 for a refused exporter). The round's records are taken in order of their
  first packet (stably: the earlier record of a pair opened it). A record joins the connection of
  its key (site, exporter, protocol, the two endpoints in either order) unless that connection has
  been quiet for longer than its idle timeout (ended first: the record starts a new one). A new
  connection is oriented by who opened it (`opener`) and read once in its exporter's scope: it is
  judged (an entry) when exactly one end is public and that end is its destination, or its source
  under an inbound policy; else it is counted `not_egress`. Past `max_connections` the least
  recently fed ends early (counted `evicted`). When the round's records are in, each new judged
  connection not yet ended gets its "flow" item: a reply in the same round counts too.
- `sweep(now, items) -> tally`: ends, oldest fed first, the connections quiet for their timeout.
- `configure(scopers, inbound)`: the scopes and inbound setting new connections are read in.
- Items appended to `items`: ("flow", NetflowEntry, True) once per judged connection, then
  ("destroy", NetflowEntry, False) with its final counters when it ends. The tally: deltas keyed
  ("records", site, outcome) with OUTCOMES, ("new",) per "flow" item, ("evicted",).

Why a C twin: a profile of the collector thread at 20,000 records/s put four fifths of its time
here (a key tuple, a dict, an object and a NamedTuple per connection, and the merge per record);
the decoder itself was a twentieth. tests/sources/test_conntable.py holds the two equal on
generated record streams (items, tallies, ids), tests/fuzz under ASan/UBSan.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from agent.connections import SERVICE_PORTS
from agent.enrich.scope import LOCAL64, TEREDO, Scoper, ip_parse
from agent.flow import Flow
from agent.flowtable import IDLE_OTHER, IDLE_TCP
from agent.wire.decode import HINT_SYN

try:
    import agent.sources.netflow._conntab as _conntab
except ImportError:  # not built (no compiler): the reference table, same results
    _conntab = None

MAX_CONNECTIONS = 262144  # connections remembered (their counters); the oldest ends early past this
EXPORT_GRACE = 60.0  # seconds an exporter may take to send a record after its flow's last packet
OUTCOMES = ("connection", "merged", "not_egress", "refused", "error")  # error: Collecting counts a failed round
_SERVICE = frozenset(int(p) for p in SERVICE_PORTS)
_new_entry = tuple.__new__  # a NetflowEntry from a tuple, without its Python-level __new__ (a call per field)


class NetflowEntry(NamedTuple):
    """One connection the collector saw, as the daemon's worker takes it: `CtEntry`'s fields (the
    open-flow key is entry[:6]), then the exporter's facts and the connection's own."""

    ct_id: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    packets: int
    bytes: int
    start_ns: int
    nat_src: str | None
    nat_dst: str | None
    last: float
    collector: str  # netflow or sflow: the `source` metric label
    exporter: str  # the exporter's site (OTHER when it is not configured)
    exporter_address: str
    in_if: int | None
    out_if: int | None
    sampled: int | None
    opened_by: str
    packets_reply: int
    bytes_reply: int
    flags: int  # TCP flags the opener's records carried (OR), and the responder's
    flags_reply: int
    # Read once by the collector from its exporter's scope, so the worker need not parse or scope
    # the addresses again: whether a public peer opened it (judged inbound), and (version,
    # integer) of its destination and source.
    inbound: bool = False
    dst_vn: tuple | None = None
    src_vn: tuple | None = None

    def flow(self, now: float, last: float | None = None) -> Flow:
        return Flow(self.proto, self.src, self.sport, self.dst, self.dport, self.packets, self.bytes,
                    self.start_ns / 1e9 if self.start_ns else now, last or self.last,
                    f"{self.collector}:{self.exporter}",
                    opened_by=self.opened_by, packets_reply=self.packets_reply, bytes_reply=self.bytes_reply,
                    tcp_flags=self.flags, tcp_flags_reply=self.flags_reply)

    def ids(self) -> dict:
        """What evidence records say of where the flow was seen."""
        out = {"exporter": self.exporter, "exporter_address": self.exporter_address}
        if self.in_if is not None or self.out_if is not None:
            out["interfaces"] = {"in": self.in_if, "out": self.out_if}
        out["sampled"] = self.sampled
        return out


def opener(r) -> tuple[bool, str]:
    """Whether a connection's first record was sent by its opener, and how that is known."""
    if r.packets_reply is not None:
        return True, "first-packet"  # a biflow (RFC 5103): its source is the initiator
    if r.proto == 6 and r.tcp_flags & (HINT_SYN | 0x12) in (HINT_SYN, 0x02, HINT_SYN | 0x02):
        return True, "syn"  # a SYN without ACK (sampled), or a direction that never acknowledged
    if r.proto in (6, 17, 132):
        s, d = r.sport < 1024 or r.sport in _SERVICE, r.dport < 1024 or r.dport in _SERVICE
        if s != d:
            return d, "port"
    return True, "first-packet"


def _first_seen(item) -> float:
    return item[0].first


def _idle(proto: int) -> float:
    return (IDLE_TCP if proto == 6 else IDLE_OTHER) + EXPORT_GRACE


class _Conn:
    """A connection's state: what its entries are made of (None: not judged; see `_emit`) and its
    counters."""

    __slots__ = ("key", "entry", "src", "sport", "packets", "bytes", "packets_reply", "bytes_reply", "first", "last",
                 "idle", "judged", "flags", "flags_reply")

    def __init__(self, key, entry, src, sport, first, last, idle):
        self.key, self.entry, self.src, self.sport = key, entry, src, sport
        self.packets = self.bytes = self.packets_reply = self.bytes_reply = self.flags = self.flags_reply = 0
        self.first, self.last, self.idle = first, last, idle
        self.judged = False  # its "flow" item was sent


class ConnTable:
    """The reference connection table; see the module doc."""

    def __init__(self, kind: str, scopers: list[Scoper], inbound: bool, next_id: int,
                 max_connections: int = MAX_CONNECTIONS):
        self.kind, self.next_id, self.max = kind, next_id, max_connections
        self.configure(scopers, inbound)
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self._items: list = []
        self._tally: dict = {}

    def configure(self, scopers: list[Scoper], inbound: bool):
        self.scopers, self.inbound = list(scopers), inbound

    def __len__(self) -> int:
        return len(self.conns)

    def _count(self, key: tuple, n: int = 1):
        self._tally[key] = self._tally.get(key, 0) + n

    def feed(self, groups: list, items: list) -> dict:
        self._items, self._tally = items, {}
        records = [(r, site, sid) for recs, site, sid in groups for r in recs]
        records.sort(key=_first_seen)
        fresh: list[_Conn] = []
        for r, site, sid in records:
            self._count(("records", site, self._record(r, site, sid, fresh)))
        for c in fresh:
            if c.entry is not None and not c.judged:
                self._emit("flow", c)
        return self._tally

    def sweep(self, now: float, items: list) -> dict:
        self._items, self._tally = items, {}
        for c in [c for c in self.conns.values() if now - c.last > c.idle]:
            self._end(c)
        return self._tally

    def _record(self, r, site: str, sid: int, fresh: list) -> str:
        """Add one record to its connection (opening it, or a new one after an idle gap); its outcome."""
        if sid < 0:
            return "refused"
        proto, src, sport, dst, dport = r[:5]
        # the pair's key, the lower endpoint first (a tuple comparison without building the tuples)
        if src < dst or src == dst and sport <= dport:
            key = (site, r.exporter, proto, src, sport, dst, dport)
        else:
            key = (site, r.exporter, proto, dst, dport, src, sport)
        c = self.conns.get(key)
        if c is not None and r.first > c.last + c.idle:
            self._end(c)  # quiet for longer than its timeout: this record starts a new connection
            c = None
        if c is None:
            c = self._open(key, r, site, self.scopers[sid])
            fresh.append(c)
            outcome = "connection" if c.entry is not None else "not_egress"
        else:
            self.conns.move_to_end(key)
            outcome = "merged" if c.entry is not None else "not_egress"
        sent = (r.packets, r.bytes, r.tcp_flags & 0xFF)
        back = (r.packets_reply or 0, r.bytes_reply or 0, r.tcp_flags_reply)  # a biflow's reverse direction
        mine, theirs = (sent, back) if src == c.src and sport == c.sport else (back, sent)
        c.packets, c.bytes, c.flags = c.packets + mine[0], c.bytes + mine[1], c.flags | mine[2]
        c.packets_reply, c.bytes_reply = c.packets_reply + theirs[0], c.bytes_reply + theirs[1]
        c.flags_reply |= theirs[2]
        if r.first < c.first:
            c.first = r.first
        if r.last > c.last:
            c.last = r.last
        return outcome

    def _open(self, key, r, site: str, scoper: Scoper) -> _Conn:
        sender, how = opener(r)
        src, sport, dst, dport = (r.src, r.sport, r.dst, r.dport) if sender else (r.dst, r.dport, r.src, r.sport)
        c = _Conn(key, None, src, sport, r.first, r.last, _idle(r.proto))
        # each address parsed and scoped once, for this and for the worker (NetflowEntry's last
        # fields). No memo: a collector's peers seldom repeat, and through one (ip_int, Scoper.scope)
        # distinct addresses cost 2.6x (measured: 6.3 us a pair against 2.4 us).
        sv, dv = ip_parse(src), ip_parse(dst)
        dst_public, src_public = scoper.scope_int(*dv) == "public", scoper.scope_int(*sv) == "public"
        if dst_public != src_public and (dst_public or self.inbound):
            self.next_id += 1
            c.entry = (self.next_id, r.proto, src, sport, dst, dport, r.exporter, r.in_if, r.out_if, r.sampled, how,
                       src_public, dv, sv)
        self.conns[key] = c
        if len(self.conns) > self.max:
            self._end(next(iter(self.conns.values())))
            self._count(("evicted",))
        return c

    def _emit(self, kind: str, c: _Conn):
        ct_id, proto, src, sport, dst, dport, exp, in_if, out_if, sampled, how, inbound, dv, sv = c.entry
        e = _new_entry(NetflowEntry, (ct_id, proto, src, sport, dst, dport, c.packets, c.bytes, int(c.first * 1e9),
                                      None, None, c.last, self.kind, c.key[0], exp,
                                      in_if, out_if, sampled, how, c.packets_reply, c.bytes_reply, c.flags,
                                      c.flags_reply, inbound, dv, sv))
        if kind == "flow":
            c.judged = True
            self._count(("new",))
        self._items.append((kind, e, kind == "flow"))

    def _end(self, c: _Conn):
        self.conns.pop(c.key, None)
        if c.entry is not None:
            if not c.judged:  # ended in the round that opened it: judged now, with what it carried
                self._emit("flow", c)
            self._emit("destroy", c)


def scope_codes(scoper: Scoper) -> tuple:
    """A scoper's interval tables as the C twin reads them: per family the starts (big-endian, 4 or
    16 octets each) and a code per interval (0 not public, 1 public, 2 Teredo, 3 NAT64-local)."""
    def code(scope: str) -> int:
        return 1 if scope == "public" else 2 if scope == TEREDO else 3 if scope == LOCAL64 else 0

    out = []
    for v, size in ((4, 4), (6, 16)):
        table = scoper.ranges(v)
        out.append(b"".join(start.to_bytes(size, "big") for start, _end, _scope in table))
        out.append(bytes(code(scope) for _start, _end, scope in table))
    return tuple(out)


class _CTable:
    """The C twin behind the reference's interface (its scopes given as `scope_codes`)."""

    def __init__(self, kind: str, scopers: list[Scoper], inbound: bool, next_id: int,
                 max_connections: int = MAX_CONNECTIONS):
        ports = bytearray(8192)
        for p in _SERVICE:
            ports[p >> 3] |= 1 << (p & 7)
        self._t = _conntab.Table(kind, NetflowEntry, next_id, max_connections, _idle(6), _idle(17), bytes(ports),
                                 HINT_SYN)
        self.configure(scopers, inbound)
        self.feed, self.sweep = self._t.feed, self._t.sweep

    def configure(self, scopers: list[Scoper], inbound: bool):
        self._t.configure([scope_codes(s) for s in scopers], inbound)

    @property
    def next_id(self) -> int:
        return self._t.next_id

    def __len__(self) -> int:
        return len(self._t)


def make_table(kind: str, scopers: list[Scoper], inbound: bool, next_id: int, c: bool = True,
               max_connections: int = MAX_CONNECTIONS):
    """The C twin where built (and `c`), else the reference."""
    if c and _conntab is not None:
        return _CTable(kind, scopers, inbound, next_id, max_connections)
    return ConnTable(kind, scopers, inbound, next_id, max_connections)
