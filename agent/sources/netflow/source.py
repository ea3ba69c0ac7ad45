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

Scale past one core: `workers: N` (N > 1) binds N sockets per listen address with SO_REUSEPORT
and gives each to a worker process (`agent.sources.netflow.workers`): the kernel hashes each
exporter's datagrams (by its address and port) to one socket, so its templates and sequence
numbers live in one worker. Workers decode and pair; this source's thread applies their tallies to
the one metrics endpoint and hands their items to the one worker thread that judges and writes the
one evidence log. A worker that dies is started again on the same sockets (datagrams wait in
their buffers meanwhile), counted in `egress_agent_source_errors_total{kind="io"}`.

Contract: `NetflowSource(daemon).open()` binds every listen address (a bad one, or one in use, is
UserError: exit 2 before any thread runs) and starts the workers; `run(stop)` reads until `stop` is
set and never raises.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import time

from agent.errors import UserError
from agent.sources.netflow.collect import (
    OUTCOMES,
    ROUND_MIN_BUFFER,
    SWEEP_EVERY,
    Collecting,
    Exporters,
    NetflowEntry,
    decoder_of,
    read,
    round_for,
)

__all__ = ["NetflowEntry", "NetflowSource", "SflowSource", "parse_listen"]
log = logging.getLogger("egress-agent")
BATCH = 4096  # items handed to the daemon's queue at once
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)


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


def bind(addrs, rcvbuf: int, kind: str, reuseport: bool = False) -> list[socket.socket]:
    """One non-blocking UDP socket per address; UserError naming the address when one cannot bind."""
    out = []
    for host, port, family in addrs:
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            try:  # room for bursts of export datagrams; the kernel's drop count says when it was not enough
                s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.bind((host, port))
        except OSError as e:
            s.close()
            for o in out:
                o.close()
            raise UserError(f"{kind}.listen: cannot listen on {host}:{port}: {e.strerror or e}") from None
        s.setblocking(False)
        out.append(s)
    return out


def apply_tally(m, kind: str, tally: dict):
    """A Collecting tally onto the metrics (the source thread's own, or a worker's shipped one)."""
    for key, n in tally.items():
        what = key[0]
        if what == "records":
            m.exporter_records(kind, key[1], key[2], n)
        elif what == "datagrams":
            m.exporter_datagrams(kind, key[1], n)
        elif what == "last":
            m.exporter_seen(kind, key[1], n)
        elif what == "lost":
            m.export_lost(kind, key[1], n)
        elif what == "refused":
            m.collector_refused(kind, key[1], n)
        elif what == "evicted":
            m.state_evicted.labels(kind).inc(n)
        elif what == "new":
            m.source_events.labels(kind, "new").inc(n)
        elif what == "error":  # connections a fault kept from the judge
            m.drops.labels(kind, "error").inc(n)


class NetflowSource:
    name = "netflow"
    KIND = "netflow"

    def __init__(self, daemon):
        self.d = daemon
        self.sockets: list[socket.socket] = []
        self.pool = None  # WorkerPool with workers > 1
        self.round = 0.0  # the wait between reads under load (collect.round_for)

    def settings(self) -> tuple:
        """What a worker needs to build its Collecting: the config and the pipeline's scope and inbound."""
        d = self.d
        sc = d.pipeline.scoper
        return d.cfg, tuple(map(str, sc.public_nets)), tuple(map(str, sc.local_nets)), d.pipeline.inbound

    def open(self) -> NetflowSource:
        d = self.d
        opts = getattr(d.cfg, self.KIND) or {}
        listen = list(opts.get("listen") or ())
        if not listen:
            raise UserError(f"{self.KIND} source: no listen address ({self.KIND}.listen in the config, or "
                            f"--{self.KIND}-listen HOST:PORT)")
        addrs = [parse_listen(a, f"{self.KIND}.listen") for a in listen]
        exporters = Exporters(d.cfg, d.pipeline.scoper)
        self._cfg = d.cfg
        rcvbuf = int(opts.get("rcvbuf", 32 << 20))
        workers = int(opts.get("workers", 1))
        m = d.metrics
        m.source(self.KIND)
        m.collector(self.KIND, exporters.labels(), OUTCOMES, decoder_of(self.KIND)[1])
        m.loss_accounting.labels(self.KIND).set(1)  # measured by the exporters' sequence numbers
        if workers > 1:
            from agent.sources.netflow.workers import WorkerPool

            groups = [bind(addrs, rcvbuf, self.KIND, reuseport=True) for _ in range(workers)]
            self.sockets = [s for g in groups for s in g]
            self.pool = WorkerPool(self.KIND, groups, self.settings())
        else:
            self.sockets = bind(addrs, rcvbuf, self.KIND)
            self.col = Collecting(self.KIND, exporters, d.pipeline.inbound)
        self.round = round_for(self.sockets)
        if not self.round:
            log.info("%s source: socket buffers under %d MiB (SO_RCVBUFFORCE needs root): datagrams are read "
                     "as they come, not gathered", self.KIND, ROUND_MIN_BUFFER >> 20)
        if exporters.refuse and not exporters.by_addr:
            log.warning("%s source: unknown_exporters is refuse and no exporter is configured: every record "
                        "will be refused (counted as outcome=refused); list them under exporters:", self.KIND)
        log.info("%s source: listening on %s (%d exporter(s) configured, unknown ones %s%s)", self.KIND,
                 ", ".join(f"{h}:{p}" for h, p, _ in addrs), len(exporters.by_addr),
                 "refused" if exporters.refuse else "judged", f"; {workers} worker processes" if workers > 1 else "")
        return self

    def _reconfigure(self):
        d = self.d
        try:
            exporters = Exporters(d.cfg, d.pipeline.scoper)
        except UserError as e:  # the reload checked the config; keep the exporters in force if not
            log.error("%s source: keeping the exporters in force: %s", self.KIND, e)
        else:
            d.metrics.collector(self.KIND, exporters.labels(), OUTCOMES, decoder_of(self.KIND)[1])
            if self.pool is not None:
                self.pool.reconfigure(self.settings())
            else:
                self.col.reconfigure(exporters, d.pipeline.inbound)
        self._cfg = d.cfg

    def close(self):
        for s in self.sockets:
            s.close()
        self.sockets = []

    def run(self, stop):
        m = self.d.metrics
        m.source_up.labels(self.KIND).set(1)
        try:
            if self.pool is not None:
                self.pool.run(stop, self)
            else:
                self._run(stop)
        finally:
            m.source_up.labels(self.KIND).set(0)
            self.close()

    def _run(self, stop):
        m, col = self.d.metrics, self.col
        by_fd = {s.fileno(): s for s in self.sockets}
        last_sweep = time.monotonic()
        while not stop.is_set():
            try:
                if self.d.cfg is not self._cfg:  # reloaded: exporters and local_nets as configured now
                    self._reconfigure()
                began = time.monotonic()
                ready = select.select(list(by_fd), [], [], 0.25)[0]
                for fd in ready:
                    col.datagrams(read(by_fd[fd]), time.time())
                if time.monotonic() - last_sweep >= SWEEP_EVERY:
                    last_sweep = time.monotonic()
                    col.sweep(time.time())
                self.hand_over(*col.take())
                if ready and self.round:  # under load: the next round's datagrams gather (collect.ROUND)
                    stop.wait(self.round - (time.monotonic() - began))
            except Exception:  # a bug or an input we did not foresee: count it, keep collecting
                log.exception("%s source: could not read or decode export datagrams", self.KIND)
                m.source_errors.labels(self.KIND, "io").inc()
                apply_tally(m, self.KIND, col.give_up())
                stop.wait(0.1)
        col.sweep(float("inf"))  # every connection ends with the source: final counters
        self.hand_over(*col.take())

    def hand_over(self, items: list, tally: dict):
        """A tally to the metrics, items to the daemon's worker (its queue counts what does not fit)."""
        if tally:
            apply_tally(self.d.metrics, self.KIND, tally)
        full = self.d.metrics.drops.labels(self.KIND, "queue_full")
        for k in range(0, len(items), BATCH):
            self.d._enqueue(items[k:k + BATCH], {"queue_full": full})


class SflowSource(NetflowSource):
    name = "sflow"
    KIND = "sflow"
