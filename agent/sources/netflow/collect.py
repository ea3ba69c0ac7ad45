"""The flow collector's state, with no daemon in sight: decoder, exporters, connections.

Contract: `Collecting(kind, exporters, inbound)` takes export datagrams (`datagrams([(payload,
exporter address)], now)`) and the passing of time (`sweep(now)`), and gives, through `take()`,
what the daemon's worker is to judge (items `("flow" | "destroy", NetflowEntry, counted)`) and a
tally of what happened since the last call (deltas, keyed: `("records", site, outcome)`,
`("datagrams", site)`, `("last", site)` a time, `("lost", site)`, `("refused", kind)`,
`("evicted",)`, `("new",)`). The source thread applies both itself; each worker process of a
collector with `workers: N` ships them to it (`agent.sources.netflow.workers`). See `source.py` for
how records become connections, and `conntable.py` for the table that pairs them.
"""

from __future__ import annotations

import ipaddress

from agent.enrich.scope import Scoper
from agent.errors import UserError
from agent.sources.netflow.conntable import EXPORT_GRACE, MAX_CONNECTIONS, OUTCOMES, NetflowEntry, make_table

DRAIN = 1024  # datagrams read from one socket per round at most
# Under load a socket is read in rounds at most this often: datagrams wait in its buffer (rcvbuf)
# and are decoded, paired, handed over and judged together. Each round has a fixed cost (select,
# the tally onto the metrics, a queue hand-over, a worker batch, an evidence write); read at every
# wake-up, a 20,000 records/s stream came in rounds of one or two datagrams. Flow records are
# seconds old when exported, so 50 ms more is nothing; DRAIN per round bounds a round's work.
ROUND = 0.05
ROUND_MIN_BUFFER = 4 << 20  # bytes of socket buffer below which datagrams are not left to gather
SWEEP_EVERY = 5.0  # seconds between looks for connections gone quiet
OTHER = "other"  # the metric label of exporters not configured
ID_BASE = 1 << 40  # connection ids above conntrack's 32-bit ids: the daemon's open-flow table holds both
# the table's names the source and the worker processes import from here, with this module's own
__all__ = ["DRAIN", "EXPORT_GRACE", "ID_BASE", "MAX_CONNECTIONS", "OTHER", "OUTCOMES", "ROUND", "ROUND_MIN_BUFFER",
           "SWEEP_EVERY", "Collecting", "Exporters", "NetflowEntry", "decoder_of", "read", "round_for"]


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


class Exporters:
    """Configured exporters by address: their metric label and the scope their flows are judged in."""

    def __init__(self, cfg, scoper: Scoper):
        self.by_addr: dict[str, tuple[str, Scoper]] = {}
        self.refuse = cfg.unknown_exporters == "refuse"
        self.default = scoper
        self.scopers = [scoper]  # every scope in force: an exporter's index into it is its `ref` below
        self._ref: dict[str, tuple[str, int]] = {}
        for i, e in enumerate(cfg.exporters):
            try:
                addr = str(ipaddress.ip_address(e["address"]))
            except ValueError:
                raise UserError(f"exporters[{i}].address: '{e['address']}' is not an IP address") from None
            own = tuple(e.get("local_nets") or ())
            sc = Scoper(public_nets=cfg.public_nets, local_nets=tuple(cfg.local_nets) + own) if own else scoper
            self.by_addr[addr] = (e.get("site") or addr, sc)
            if sc is not scoper:
                self.scopers.append(sc)
            self._ref[addr] = (e.get("site") or addr, len(self.scopers) - 1 if sc is not scoper else 0)
        self._other = (OTHER, -1 if self.refuse else 0)

    def labels(self) -> list[str]:
        return sorted({site for site, _ in self.by_addr.values()} | {OTHER})

    def of(self, addr: str) -> tuple[str, Scoper | None]:
        """(metric label, scoper) of an exporter; scoper None: refused."""
        site, sid = self.ref(addr)
        return site, (None if sid < 0 else self.scopers[sid])

    def ref(self, addr: str) -> tuple[str, int]:
        """(metric label, index of its scoper in `scopers`) of an exporter; index -1: refused."""
        return self._ref.get(addr, self._other)


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

    def __init__(self, kind: str, exporters: Exporters, inbound: bool, id_base: int = ID_BASE, c: bool = True):
        self.kind, self.exporters, self.inbound = kind, exporters, inbound
        self.decoder, self.kinds = decoder_of(kind)
        self.table = make_table(kind, exporters.scopers, inbound, id_base, c)
        self.items: list = []
        self.tally: dict = {}
        self._lost_seen: dict[str, int] = {}
        self._refused_seen: dict[str, int] = {}

    def reconfigure(self, exporters: Exporters, inbound: bool):
        """A reloaded config: connections opened from now on are read in these exporters' scopes."""
        self.exporters, self.inbound = exporters, inbound
        self.table.configure(exporters.scopers, inbound)

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
        groups = []
        decode, ref, tally = self.decoder.datagram, self.exporters.ref, self.tally
        for data, exporter in got:
            site, sid = ref(exporter)
            key = ("datagrams", site)
            tally[key] = tally.get(key, 0) + 1
            tally[("last", site)] = now
            recs = decode(data, exporter, now)
            if recs:
                groups.append((recs, site, sid))
        self._account()
        try:
            deltas = self.table.feed(groups, self.items)
        except Exception:
            # A table that failed mid-round gives no outcomes: every record of the round is counted
            # here instead (items it made already are counted dropped by `give_up`), then the fault
            # goes on to the source, which logs and counts it.
            for recs, site, _sid in groups:
                self._count(("records", site, "error"), len(recs))
            raise
        self._add(deltas)

    def _add(self, deltas: dict):
        tally = self.tally
        for key, n in deltas.items():
            tally[key] = tally.get(key, 0) + n

    def sweep(self, now: float):
        """End the connections whose exporters have said nothing of them for their idle timeout."""
        self._add(self.table.sweep(now, self.items))

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
