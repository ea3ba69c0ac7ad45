"""The flow collector's state, with no daemon in sight: decoder, exporters, connections.

Contract: `Collecting(kind, exporters, inbound)` takes export datagrams (`datagrams([(payload,
exporter address)], now)`) and the passing of time (`sweep(now)`), and gives, through `take()`,
what the daemon's worker is to judge (items `("flow" | "destroy", NetflowEntry, counted)`) and a
tally of what happened since the last call (deltas, keyed: `("records", site, outcome)`,
`("datagrams", site)`, `("last", site)` a time, `("lost", site)`, `("refused", kind)`,
`("evicted",)`, `("new",)`). The source thread applies both itself; each worker process of a
collector with `workers: N` ships them to it (`agent.sources.netflow.workers`). See `source.py` for
how records become connections.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import NamedTuple

from agent.connections import SERVICE_PORTS
from agent.enrich.scope import Scoper, ip_parse
from agent.errors import UserError
from agent.flow import Flow
from agent.flowtable import IDLE_OTHER, IDLE_TCP
from agent.wire.decode import HINT_SYN

DRAIN = 1024  # datagrams read from one socket per round at most
# Under load a socket is read in rounds at most this often: datagrams wait in its buffer (rcvbuf)
# and are decoded, paired, handed over and judged together. Each round has a fixed cost (select,
# the tally onto the metrics, a queue hand-over, a worker batch, an evidence write); read at every
# wake-up, a 20,000 records/s stream came in rounds of one or two datagrams. Flow records are
# seconds old when exported, so 50 ms more is nothing; DRAIN per round bounds a round's work.
ROUND = 0.05
ROUND_MIN_BUFFER = 4 << 20  # bytes of socket buffer below which datagrams are not left to gather
SWEEP_EVERY = 5.0  # seconds between looks for connections gone quiet
MAX_CONNECTIONS = 262144  # connections remembered (their counters); the oldest ends early past this
EXPORT_GRACE = 60.0  # seconds an exporter may take to send a record after its flow's last packet
OTHER = "other"  # the metric label of exporters not configured
ID_BASE = 1 << 40  # connection ids above conntrack's 32-bit ids: the daemon's open-flow table holds both
OUTCOMES = ("connection", "merged", "not_egress", "refused")
_SERVICE = frozenset(int(p) for p in SERVICE_PORTS)
_new_entry = tuple.__new__  # a NetflowEntry from a tuple, without its Python-level __new__ (a call per field)


def _first_seen(item) -> float:
    return item[0].first


def round_for(sockets) -> float:
    """The wait between reads of these sockets under load: ROUND where every receive buffer holds
    at least ROUND_MIN_BUFFER (root's SO_RCVBUFFORCE; ~2,800 full datagrams, 56,000 a second at
    50 ms), else 0: a small buffer (an unprivileged agent capped by net.core.rmem_max) would
    overflow while datagrams gather, so its sockets are read at every wake-up."""
    import socket

    try:
        least = min(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in sockets)
    except (OSError, ValueError):
        return 0.0
    return ROUND if least >= ROUND_MIN_BUFFER else 0.0


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


class Exporters:
    """Configured exporters by address: their metric label and the scope their flows are judged in."""

    def __init__(self, cfg, scoper: Scoper):
        self.by_addr: dict[str, tuple[str, Scoper]] = {}
        self.refuse = cfg.unknown_exporters == "refuse"
        self.default = scoper
        for i, e in enumerate(cfg.exporters):
            try:
                addr = str(ipaddress.ip_address(e["address"]))
            except ValueError:
                raise UserError(f"exporters[{i}].address: '{e['address']}' is not an IP address") from None
            own = tuple(e.get("local_nets") or ())
            sc = Scoper(public_nets=cfg.public_nets, local_nets=tuple(cfg.local_nets) + own) if own else scoper
            self.by_addr[addr] = (e.get("site") or addr, sc)

    def labels(self) -> list[str]:
        return sorted({site for site, _ in self.by_addr.values()} | {OTHER})

    def of(self, addr: str) -> tuple[str, Scoper | None]:
        """(metric label, scoper) of an exporter; scoper None: refused."""
        got = self.by_addr.get(addr)
        if got is not None:
            return got
        return OTHER, (None if self.refuse else self.default)


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


def _opener_is_sender(r) -> tuple[bool, str]:
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



def read(sock, limit: int = DRAIN) -> list[tuple[bytes, str]]:
    """Up to `limit` datagrams waiting on a socket, as (payload, exporter address)."""
    got = []
    for _ in range(limit):
        try:
            data, peer = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            break
        exporter = peer[0].split("%")[0]
        if exporter.startswith("::ffff:") and "." in exporter:
            exporter = exporter[7:]
        got.append((data, exporter))
    return got


def decoder_of(kind: str):
    """(decoder, its refusal kinds) of a collector kind."""
    if kind == "sflow":
        from agent.sources.netflow.sflow import KINDS, SflowDecoder

        return SflowDecoder(), KINDS
    from agent.sources.netflow.decode import KINDS, Collector

    return Collector(), KINDS


class Collecting:
    """One collector's decoder and connections; see the module doc."""

    def __init__(self, kind: str, exporters: Exporters, inbound: bool, id_base: int = ID_BASE):
        self.kind, self.exporters, self.inbound = kind, exporters, inbound
        self.decoder, self.kinds = decoder_of(kind)
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self._next_id = id_base
        self.items: list = []
        self.tally: dict = {}
        self._lost_seen: dict[str, int] = {}
        self._refused_seen: dict[str, int] = {}

    def take(self) -> tuple[list, dict]:
        items, tally = self.items, self.tally
        self.items, self.tally = [], {}
        return items, tally

    def give_up(self) -> dict:
        """After a fault mid-round: the tally so far, with the round's connections that will not reach
        the judge counted as dropped (`("error",)`), so the books still add up."""
        items, tally = self.take()
        lost = sum(1 for _kind, _e, counted in items if counted)
        if lost:
            tally[("error",)] = tally.get(("error",), 0) + lost
        return tally

    def _count(self, key: tuple, n: int = 1):
        self.tally[key] = self.tally.get(key, 0) + n

    def datagrams(self, got: list, now: float):
        """Decode (payload, exporter address) pairs read together; their connections' items follow."""
        records = []
        decode, of, tally = self.decoder.datagram, self.exporters.of, self.tally
        for data, exporter in got:
            site, scoper = of(exporter)
            key = ("datagrams", site)
            tally[key] = tally.get(key, 0) + 1
            tally[("last", site)] = now
            for r in decode(data, exporter, now):
                records.append((r, site, scoper))
        self._account()
        records.sort(key=_first_seen)  # the earlier record of a pair opened it (first-packet)
        fresh: list[_Conn] = []
        outcomes: dict[tuple, int] = {}
        record = self._record
        for r, site, scoper in records:
            key = ("records", site, record(r, site, scoper, fresh))
            outcomes[key] = outcomes.get(key, 0) + 1
        for key, n in outcomes.items():
            self._count(key, n)
        for c in fresh:  # judged once the round's records are in: a reply in the same round counts too
            if c.entry is not None and not c.judged:
                self._emit("flow", c)

    def _account(self):
        """Export loss and decoder refusals, by their increase since the last read."""
        dec = self.decoder
        if len(dec.datagrams) > MAX_CONNECTIONS:  # per-exporter tallies: spoofed sources never grow them unbounded
            dec.datagrams.clear()
        for exp, n in dec.lost.items():
            grew = n - self._lost_seen.get(exp, 0)
            if grew > 0:
                self._lost_seen[exp] = n
                self._count(("lost", self.exporters.of(exp)[0]), grew)
        for kind, n in dec.counts.items():
            grew = n - self._refused_seen.get(kind, 0)
            if grew > 0:
                self._refused_seen[kind] = n
                self._count(("refused", kind), grew)
        if len(self._lost_seen) > 4 * MAX_CONNECTIONS:  # exporters come and go: never unbounded
            self._lost_seen.clear()
            dec.lost.clear()

    def _record(self, r, site: str, scoper: Scoper | None, fresh: list) -> str:
        """Add one record to its connection (opening it, or a new one after an idle gap); its outcome."""
        if scoper is None:
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
            c = self._open(key, r, site, scoper)
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
        sender, how = _opener_is_sender(r)
        src, sport, dst, dport = (r.src, r.sport, r.dst, r.dport) if sender else (r.dst, r.dport, r.src, r.sport)
        idle = (IDLE_TCP if r.proto == 6 else IDLE_OTHER) + EXPORT_GRACE
        c = _Conn(key, None, src, sport, r.first, r.last, idle)
        # each address parsed and scoped once, for this and for the worker (NetflowEntry's last
        # fields). No memo: a collector's peers seldom repeat, and through one (ip_int, Scoper.scope)
        # distinct addresses cost 2.6x (measured: 6.3 us a pair against 2.4 us).
        sv, dv = ip_parse(src), ip_parse(dst)
        dst_public, src_public = scoper.scope_int(*dv) == "public", scoper.scope_int(*sv) == "public"
        if dst_public != src_public and (dst_public or self.inbound):
            self._next_id += 1
            c.entry = (self._next_id, r.proto, src, sport, dst, dport, r.exporter, r.in_if, r.out_if, r.sampled, how,
                       src_public, dv, sv)
        self.conns[key] = c
        if len(self.conns) > MAX_CONNECTIONS:
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
        self.items.append((kind, e, kind == "flow"))

    def _end(self, c: _Conn):
        self.conns.pop(c.key, None)
        if c.entry is not None:
            if not c.judged:  # ended in the round that opened it: judged now, with what it carried
                self._emit("flow", c)
            self._emit("destroy", c)

    def sweep(self, now: float):
        """End the connections whose exporters have said nothing of them for their idle timeout."""
        for c in [c for c in self.conns.values() if now - c.last > c.idle]:
            self._end(c)
