"""The collector's live sources: what routers export, judged as connections.

    sources: [netflow]              # or [sflow], or both; beside conntrack and capture or alone
    netflow:
      listen: ["0.0.0.0:2055"]      # UDP; NetFlow v5, v9 and IPFIX told apart by the version field
      rcvbuf: 33554432              # socket buffer; the kernel's drop count is exported
    sflow:
      listen: ["0.0.0.0:6343"]      # sFlow v5 flow samples: sampled packet headers
    exporters:                      # who exports, under which name, and what is local behind it
      - {address: 192.0.2.1, site: paris, local_nets: [10.1.0.0/16]}
    unknown_exporters: judge        # an exporter not listed: judged with the global local_nets
                                    # (metrics say `other`), or `refuse`d; counted either way

Records become connections as the audit's are (`agent.connections`): a record and its reverse are
one connection, oriented by who opened it (`syn`: a TCP record whose packets had SYN and never
ACK, or a sampled SYN; `port`: a service port against an ephemeral one; `first-packet`: the earlier
record of the pair, a read round's records being taken in order of first seen). A connection's
later records (the reverse direction, or an exporter's active-timeout splits) add to it until it has
been quiet for its idle timeout (`flowtable.IDLE_TCP`/`IDLE_OTHER`, plus EXPORT_GRACE for exporters'
delays). Egress connections (the opener local for its exporter, its peer public) and, while some
policy asks, inbound ones go to the worker as "flow" events, judged once; when one goes quiet a
"destroy" event brings its final counters (bytes to metrics, an `end` evidence record).

The books, per exporter (`egress_agent_exporter_records_total{exporter,outcome}`): every record
decoded is a `connection` (judged or queued), `merged` (part of a connection already counted),
`not_egress` or `refused` (an unknown exporter, with `unknown_exporters: refuse`); connections
are judged, queued or `source_drops_total{reason="queue_full"}`, as conntrack's flows are;
sequence gaps are `egress_agent_exporter_lost_records_total` and
`source_drops_total{reason="export_loss"}`; what the decoders could not read is
`egress_agent_collector_refused_total{kind}`.
Labels are bounded: exporters by their configured site, every other exporter is `other`.

Contract: `NetflowSource(daemon).open()` binds every listen address (a bad one, or one in use, is
UserError: exit 2 before any thread runs); `run(stop)` reads until `stop` is set and never raises.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import time
from collections import OrderedDict
from typing import NamedTuple

from agent.connections import SERVICE_PORTS
from agent.enrich.scope import Scoper
from agent.errors import UserError
from agent.flow import Flow
from agent.flowtable import IDLE_OTHER, IDLE_TCP
from agent.wire.decode import HINT_SYN

log = logging.getLogger("egress-agent")
DRAIN = 256  # datagrams read from one socket per wake-up at most
MAX_CONNECTIONS = 262144  # connections remembered (their counters); the oldest ends early past this
SWEEP_EVERY = 5.0  # seconds between looks for connections gone quiet
EXPORT_GRACE = 60.0  # seconds an exporter may take to send a record after its flow's last packet
OTHER = "other"  # the metric label of exporters not configured
ID_BASE = 1 << 40  # connection ids above conntrack's 32-bit ids: the daemon's open-flow table holds both
OUTCOMES = ("connection", "merged", "not_egress", "refused")
_SERVICE = frozenset(int(p) for p in SERVICE_PORTS)


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

    def flow(self, now: float, last: float | None = None) -> Flow:
        return Flow(self.proto, self.src, self.sport, self.dst, self.dport, self.packets, self.bytes,
                    self.start_ns / 1e9, last or self.last, f"{self.collector}:{self.exporter}",
                    opened_by=self.opened_by, packets_reply=self.packets_reply, bytes_reply=self.bytes_reply,
                    tcp_flags=self.flags, tcp_flags_reply=self.flags_reply)

    def ids(self) -> dict:
        """What evidence records say of where the flow was seen."""
        out = {"exporter": self.exporter, "exporter_address": self.exporter_address}
        if self.in_if is not None or self.out_if is not None:
            out["interfaces"] = {"in": self.in_if, "out": self.out_if}
        out["sampled"] = self.sampled
        return out


def parse_listen(text: str, what: str) -> tuple[str, int, int]:
    """(host, port, address family) of HOST:PORT or [V6]:PORT; UserError naming `what` otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise UserError(f"{what}: '{text}' is not ADDRESS:PORT (e.g. 0.0.0.0:2055 or [::]:2055)") from None
    return str(ip), int(port), socket.AF_INET if ip.version == 4 else socket.AF_INET6


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
    """A connection's state: the entry sent to the worker (None: not judged) and its counters."""

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


class NetflowSource:
    name = "netflow"
    KIND = "netflow"

    def __init__(self, daemon):
        self.d = daemon
        self.name = self.KIND
        self.sockets: list[socket.socket] = []
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self._next_id = ID_BASE
        self._batch: list = []
        self._lost_seen: dict[str, int] = {}

    def _decoder(self):
        from agent.sources.netflow.decode import KINDS, Collector

        return Collector(), KINDS

    def open(self) -> NetflowSource:
        d = self.d
        opts = getattr(d.cfg, self.KIND) or {}
        listen = list(opts.get("listen") or ())
        if not listen:
            raise UserError(f"{self.KIND} source: no listen address ({self.KIND}.listen in the config, or "
                            f"--{self.KIND}-listen HOST:PORT)")
        addrs = [parse_listen(a, f"{self.KIND}.listen") for a in listen]
        self.exporters = Exporters(d.cfg, d.pipeline.scoper)
        self._cfg = d.cfg
        self.decoder, kinds = self._decoder()
        self._kinds = kinds
        rcvbuf = int(opts.get("rcvbuf", 32 << 20))
        for host, port, family in addrs:
            s = socket.socket(family, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:  # room for bursts of export datagrams; the kernel's drop count says when it was not enough
                    s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.bind((host, port))
            except OSError as e:
                s.close()
                self.close()
                raise UserError(f"{self.KIND}.listen: cannot listen on {host}:{port}: {e.strerror or e}") from None
            s.setblocking(False)
            self.sockets.append(s)
        m = d.metrics
        m.source(self.KIND)
        m.collector(self.KIND, self.exporters.labels(), OUTCOMES, kinds)
        m.loss_accounting.labels(self.KIND).set(1)  # measured by the exporters' sequence numbers
        log.info("%s source: listening on %s (%d exporter(s) configured, unknown ones %s)", self.KIND,
                 ", ".join(f"{h}:{p}" for h, p, _ in addrs), len(self.exporters.by_addr),
                 "refused" if self.exporters.refuse else "judged")
        return self

    def _reconfigure(self):
        d = self.d
        try:
            exporters = Exporters(d.cfg, d.pipeline.scoper)
        except UserError as e:  # the reload checked the config; keep the exporters in force if not
            log.error("%s source: keeping the exporters in force: %s", self.KIND, e)
        else:
            self.exporters = exporters
            d.metrics.collector(self.KIND, exporters.labels(), OUTCOMES, self._kinds)
        self._cfg = d.cfg

    def close(self):
        for s in self.sockets:
            s.close()
        self.sockets = []

    def run(self, stop):
        m = self.d.metrics
        m.source_up.labels(self.KIND).set(1)
        by_fd = {s.fileno(): s for s in self.sockets}
        last_sweep = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if self.d.cfg is not self._cfg:  # reloaded: exporters and local_nets as configured now
                        self._reconfigure()
                    ready = select.select(list(by_fd), [], [], 0.25)[0]
                    for fd in ready:
                        self._drain(by_fd[fd])
                    if time.monotonic() - last_sweep >= SWEEP_EVERY:
                        last_sweep = time.monotonic()
                        self._sweep(time.time())
                    self._flush()
                except Exception:  # a bug or an input we did not foresee: count it, keep collecting
                    log.exception("%s source: could not read or decode export datagrams", self.KIND)
                    m.source_errors.labels(self.KIND, "io").inc()
                    self._batch = []
                    stop.wait(0.1)
            self._sweep(float("inf"))  # every connection ends with the source: final counters
            self._flush()
        finally:
            m.source_up.labels(self.KIND).set(0)
            self.close()

    def _drain(self, sock):
        records = []
        now = time.time()
        for _ in range(DRAIN):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            exporter = peer[0].split("%")[0]
            if exporter.startswith("::ffff:") and "." in exporter:
                exporter = exporter[7:]
            site, scoper = self.exporters.of(exporter)
            self.d.metrics.exporter_datagrams(self.KIND, site)
            for r in self.decoder.datagram(data, exporter, now):
                records.append((r, site, scoper))
        self._account()
        records.sort(key=lambda x: x[0].first)  # the earlier record of a pair opened it (first-packet)
        fresh: list[_Conn] = []
        for r, site, scoper in records:
            self._record(r, site, scoper, fresh)
        for c in fresh:  # judged once the round's records are in: a reply in the same round counts too
            if c.entry is not None and not c.judged:
                self._emit("flow", c)

    def _account(self):
        """Export loss and decoder refusals, by their increase since the last read."""
        m, dec = self.d.metrics, self.decoder
        if len(dec.datagrams) > MAX_CONNECTIONS:  # per-exporter tallies: spoofed sources never grow them unbounded
            dec.datagrams.clear()
        for exp, n in dec.lost.items():
            grew = n - self._lost_seen.get(exp, 0)
            if grew > 0:
                self._lost_seen[exp] = n
                m.export_lost(self.KIND, self.exporters.of(exp)[0], grew)
        for kind, n in dec.counts.items():
            if n:
                m.collector_refused(self.KIND, kind, n)
        if len(self._lost_seen) > 4 * MAX_CONNECTIONS:  # exporters come and go: never unbounded
            self._lost_seen.clear()
            dec.lost.clear()

    def _record(self, r, site: str, scoper: Scoper | None, fresh: list):
        m = self.d.metrics
        if scoper is None:
            m.exporter_records(self.KIND, site, "refused")
            return
        a, b = (r.src, r.sport), (r.dst, r.dport)
        key = (site, r.exporter, r.proto, *(a + b if a <= b else b + a))
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
        fwd = (r.src, r.sport) == (c.src, c.sport)
        sent = (r.packets, r.bytes, r.tcp_flags & 0xFF)
        back = (r.packets_reply or 0, r.bytes_reply or 0, r.tcp_flags_reply)  # a biflow's reverse direction
        for (pk, by, fl), mine in ((sent, fwd), (back, not fwd)):
            if mine:
                c.packets, c.bytes, c.flags = c.packets + pk, c.bytes + by, c.flags | fl
            else:
                c.packets_reply, c.bytes_reply = c.packets_reply + pk, c.bytes_reply + by
                c.flags_reply |= fl
        c.first, c.last = min(c.first, r.first), max(c.last, r.last)
        m.exporter_records(self.KIND, site, outcome)

    def _open(self, key, r, site: str, scoper: Scoper) -> _Conn:
        sender, how = _opener_is_sender(r)
        src, sport, dst, dport = (r.src, r.sport, r.dst, r.dport) if sender else (r.dst, r.dport, r.src, r.sport)
        idle = (IDLE_TCP if r.proto == 6 else IDLE_OTHER) + EXPORT_GRACE
        c = _Conn(key, None, src, sport, r.first, r.last, idle)
        pipe = self.d.pipeline
        if scoper.is_egress(src, dst) or (pipe.inbound and scoper.is_egress(dst, src)):
            self._next_id += 1
            c.entry = NetflowEntry(self._next_id, r.proto, src, sport, dst, dport, 0, 0, int(r.first * 1e9), None,
                                   None, r.last, self.KIND, site, r.exporter, r.in_if, r.out_if, r.sampled, how,
                                   0, 0, 0, 0)
        self.conns[key] = c
        if len(self.conns) > MAX_CONNECTIONS:
            self._end(next(iter(self.conns.values())))
            self.d.metrics.state_evicted.labels(self.KIND).inc()
        return c

    def _emit(self, kind: str, c: _Conn):
        e = c.entry._replace(packets=c.packets, bytes=c.bytes, packets_reply=c.packets_reply,
                             bytes_reply=c.bytes_reply, start_ns=int(c.first * 1e9), last=c.last, flags=c.flags,
                             flags_reply=c.flags_reply)
        if kind == "flow":
            c.judged = True
            self.d.metrics.source_events.labels(self.KIND, "new").inc()
        self._batch.append((kind, e, kind == "flow"))
        if len(self._batch) >= 4096:
            self._flush()

    def _end(self, c: _Conn):
        self.conns.pop(c.key, None)
        if c.entry is not None:
            if not c.judged:  # ended in the round that opened it: judged now, with what it carried
                self._emit("flow", c)
            self._emit("destroy", c)

    def _sweep(self, now: float):
        """End the connections whose exporters have said nothing of them for their idle timeout."""
        for c in [c for c in self.conns.values() if now - c.last > c.idle]:
            self._end(c)

    def _flush(self):
        if self._batch:
            batch, self._batch = self._batch, []
            self.d._enqueue(batch, {"queue_full": self.d.metrics.drops.labels(self.KIND, "queue_full")})


class SflowSource(NetflowSource):
    name = "sflow"
    KIND = "sflow"

    def _decoder(self):
        from agent.sources.netflow.sflow import KINDS, SflowDecoder

        return SflowDecoder(), KINDS
