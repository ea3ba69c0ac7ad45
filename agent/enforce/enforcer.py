"""The daemon's side of enforcement: build the table, keep it current, turn its counters into
metrics and the connections it refused into evidence.

Contract for the daemon: `Enforcer(daemon)`; run `run(stop)` on a thread of its own, then
`wait_ready()` (raises UserError, exit 2, when the first build fails: the agent never runs
believing it refuses what it does not); `request(why)` asks for a rebuild (reload, a new GeoIP
database); `record(item, now)` is called by the worker for each `refused` item this puts on the
daemon's queue, so the evidence log keeps one writer.

All netlink work happens on the enforcement thread, which first enters the watched namespace
(`source.netns`), so the table lives where the connections are. A rebuild that fails (a policy
set that would catch a never-refuse network, the kernel refusing the table) keeps the table in
force, logs the reason at err level and sets `egress_agent_enforcement_build_success` to 0. The
day is checked every poll: exceptions expire and laws take effect at UTC midnight, so the sets
are rebuilt when the date changes.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from agent.enforce.compile import compile_plan, probe_flow
from agent.enforce.cuts import location_cuts
from agent.enforce.never import never_refuse
from agent.enforce.nft import SEEN_SIZE, TABLE, Nft, NftError, render
from agent.errors import UserError
from agent.flow import Flow, Outcome
from agent.policy.model import effective_mode

log = logging.getLogger("egress-agent")
CLONE_NEWNET = 0x40000000
MAX_PENDING = 4096  # DNS answers waiting for the enforcement thread


@dataclass(frozen=True)
class Refused:
    """One refused connection as the kernel remembered it (no source port: the set keys by
    source, destination, protocol and destination port)."""

    policy: str
    proto: int
    src: str
    dst: str
    dport: int


def enter_netns(name: str):
    """Move the calling thread into the named network namespace (setns is per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


class Enforcer:
    def __init__(self, d, clock=time.time):
        self.d = d
        self.clock = clock
        self.nft: Nft | None = None
        self.plan = None
        self.owner = True
        self.applied = False
        self.error: str | None = None
        self.ready = threading.Event()
        self.requests: queue.Queue = queue.Queue()
        self._packets: dict[str, int] = {}
        self._known: dict[tuple, float] = {}
        self._day = None
        self._cuts = None  # (database stamps, their Cuts)
        self._judge, self._index, self._by_name, self._probes = None, {}, frozenset(), {}
        self._names_lock = threading.Lock()  # the sets' judge: answers (enforcement thread) and rebuilds
        self._tokens, self._token_t, self._quiet = 5.0, 0.0, 0
        d.metrics.enforcement_ok.set(1)  # nothing failed yet (a bare gauge would say 0: an alert)

    @property
    def options(self) -> dict:
        return getattr(self.d.cfg, "enforcement", None) or {}

    def refusing(self, pipeline=None) -> list:
        pipe = pipeline or self.d.pipeline
        return [p for p in pipe.policies if effective_mode(p.enforce, self.d.cfg.enforce) == "refuse"]

    # -- thread -----------------------------------------------------------------------------
    def run(self, stop: threading.Event):
        try:
            if ns := self.d.cfg.source.get("netns"):
                enter_netns(ns)
            if self.refusing():
                self._build("start")
        except (UserError, NftError, OSError) as e:
            self.error = str(e) + ("".join(f"\n  {p}" for p in e.problems) if isinstance(e, UserError) else "")
            if "not permitted" in self.error:
                self.error += " (refusing connections needs CAP_NET_ADMIN: run as root or under the shipped unit)"
        finally:
            self.ready.set()
        if self.error:
            return
        every = float(self.options.get("poll_interval", 1.0))
        polled = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    why = self.requests.get(timeout=max(0.0, polled + every - time.monotonic()))
                except queue.Empty:
                    why = None
                if isinstance(why, tuple):  # a DNS answer: at once, the program is about to connect
                    self._answer(*why)
                    if time.monotonic() - polled < every:
                        continue  # a steady stream of answers still lets the counters be read on time
                    why = None
                polled = time.monotonic()
                day = int(self.clock() // 86400)
                if why is None and self.applied and self._day is not None and day != self._day:
                    why = "the date changed (exceptions and effective dates)"
                if why is not None:
                    self._rebuild(why)
                if self.applied:
                    try:
                        self._poll()
                    except Exception:  # a bug reading back must not stop refusing (the table stays)
                        log.exception("enforcement: reading the table back failed")
        finally:
            self.close()

    def wait_ready(self, timeout: float = 600.0):
        self.ready.wait(timeout)
        if self.error:
            raise UserError(f"enforcement: {self.error}")

    def request(self, why: str):
        self.requests.put(why)

    # -- names ------------------------------------------------------------------------------
    def dns_answer(self, qname: str, chain: tuple, addr: bytes, ttl: int, at: float):
        """The capture believed a DNS answer (capture thread): hand it to the enforcement thread
        when a refuse policy allows by name. Bounded: beyond MAX_PENDING waiting answers, counted."""
        if not self._by_name:
            return
        if self.requests.qsize() >= MAX_PENDING:
            self.d.metrics.enforcement_names_dropped.inc()
            return
        self.requests.put((qname, chain, addr, ttl))

    def _answer(self, qname: str, chain: tuple, addr: bytes, ttl: int):
        """Put the answer's address in each policy's allow-by-name set, for the answer's TTL (at
        least `name_ttl_floor`), when the engine excuses a connection to it under that name and
        the address is in the policy's refuse set (elsewhere it passes anyway)."""
        with self._names_lock:
            if self.applied and self._judge is not None:
                self._allow(qname, chain, addr, ttl)

    def _allow(self, qname: str, chain: tuple, addr: bytes, ttl: int):
        ip = ipaddress.ip_address(addr)
        v, n = ip.version, int(ip)
        timeout = max(int(ttl), int(self.options.get("name_ttl_floor", 60)))
        adds = []
        for i, p in enumerate(self.plan.policies):
            if p.name not in self._by_name or not _holds(p.dst[v], n):
                continue
            probe = self._probes[(p.name, v)]
            if probe is None:
                continue
            flow = Flow(probe.proto, probe.src, 40000, str(ip), probe.dport, first_seen=self.clock(),
                        who=probe.who, hostname=qname, hostname_source="dns", hostname_chain=tuple(chain))
            verdict = self._judge.judge(flow).verdicts[self._index[p.name]]
            if verdict.outcome != Outcome.VIOLATION:
                adds.append(f"add element inet {TABLE} p{i}_names{v} {{ {ip} timeout {timeout}s }}")
        if adds:
            try:
                self.nft.run("\n".join(adds))
                self.d.metrics.enforcement_names.inc(len(adds))
            except NftError as e:
                log.error("enforcement: cannot allow %s (%s) by name: %s", ip, qname, e)

    # -- building ---------------------------------------------------------------------------
    def _rebuild(self, why: str):
        try:
            if self.applied:
                self._poll()  # the old counters are read out before the table is replaced
            self._build(why)
            self.d.metrics.enforcement_ok.set(1)
        except Exception as e:  # noqa: BLE001 - whatever failed, the table in force stays
            self.d.metrics.enforcement_ok.set(0)
            extra = "".join(f"\n  {p}" for p in getattr(e, "problems", ()))
            log.error("enforcement: rebuild (%s) failed; the refuse sets in force stay: %s%s", why, e, extra)

    def _build(self, why: str):
        from agent.enrich.geoip import Locator
        from agent.judge.pipeline import Pipeline

        t0 = time.perf_counter()
        d, pipe = self.d, self.d.pipeline
        refusing = self.refusing(pipe)
        if not refusing:
            if self.applied:
                self.nft.run(f"delete table inet {TABLE}")
                self.applied, self.plan = False, None
                d.metrics.enforcement_elements.clear()
                log.info("enforcement: no policy refuses any more (%s); table removed", why)
            return
        local = tuple(d.cfg.local_nets) + tuple(d.host_addrs) + d.cfg.exporter_nets()
        keep, skipped = never_refuse(d.cfg, local, self.options.get("resolv_conf", "/etc/resolv.conf"))
        for s in skipped:
            log.warning("enforcement: never-refuse entry skipped: %s", s)
        # its own locator and verdict cache: the worker judges with the daemon's meanwhile
        judge = Pipeline(pipe.policies, pipe.jurisdictions, Locator(d.cfg.geoip_databases, pipe.scoper),
                         pipe.scoper, register=pipe.register)
        # the database's cuts are read again only when a database file changed (seconds for a whole world)
        stamps = tuple((db.path, db.stamp) for db in judge.locator.dbs)
        if self._cuts is None or self._cuts[0] != stamps:
            self._cuts = (stamps, location_cuts(judge.locator))
        plan = compile_plan(judge, refusing, keep, self._cuts[1], self.clock())
        for p in plan.problems():  # left out of the sets; `policy check --config` refuses such a policy
            log.warning("enforcement: %s; never refused", p)
        for w in plan.warnings:
            log.warning("enforcement: %s", w)
        if self.nft is None:
            self.nft = Nft()
            self.owner = self.options.get("fail", "open") == "open"
        forward = bool(self.options.get("forward", False))
        timeout = int(self.options.get("seen_timeout", 300))
        by_name = frozenset(p.name for p in refusing if _names(p))
        # a table left by an earlier run (fail: closed, or a kernel without owner tables) is replaced
        # in the same transaction, never added to
        replace = self.applied or self._exists()
        try:
            with self._names_lock:  # no allow-by-name element goes in while the table is replaced
                self.nft.run(render(plan, self.owner, forward, timeout, replace=replace, names=by_name))
        except NftError as e:
            if not (self.owner and not self.applied and "not supported" in str(e).lower()):
                raise
            # a kernel before 5.12 has no owner tables: a plain one, removed at stop and by ExecStopPost=
            log.warning("enforcement: this kernel has no owner tables (%s); the table is removed at stop and by "
                        "the unit's ExecStopPost=, not by the kernel if the agent is killed", e)
            self.owner = False
            self.nft.run(render(plan, False, forward, timeout, replace=self._exists(), names=by_name))
        with self._names_lock:
            self.applied, self.plan = True, plan
            self._judge, self._index = judge, {p.name: i for i, p in enumerate(judge.policies)}
            self._by_name = by_name
            self._probes = {(p.name, v): probe_flow(p, v) for p in refusing for v in (4, 6)}
        self._packets = dict.fromkeys((p.name for p in plan.policies), 0)
        self._known.clear()
        self._day = int(self.clock() // 86400)
        took = time.perf_counter() - t0
        m = d.metrics
        m.enforcement_elements.clear()
        for p in plan.policies:
            for v, n in p.elements().items():
                m.enforcement_elements.labels(p.name, f"ipv{v}").set(n)
        m.enforcement_build.set(took)
        m.enforcement_built.set(time.time())
        m.enforcement_ok.set(1)
        sizes = ", ".join(f"{p.name}: {p.elements()[4]} IPv4 and {p.elements()[6]} IPv6 intervals"
                          for p in plan.policies)
        log.info("enforcement: refuse sets built (%s) in %.2f s from %d pieces of address space; %s",
                 why, took, plan.pieces, sizes)

    def _exists(self) -> bool:
        try:
            self.nft.run(f"list table inet {TABLE}")
            return True
        except NftError:
            return False

    # -- reading back -----------------------------------------------------------------------
    def _poll(self):
        """Counters into `egress_agent_enforcement_refused_total`; connections first seen in the
        sets become `refused` items for the worker (evidence)."""
        plan, m = self.plan, self.d.metrics
        try:
            data = self.nft.json(f"list counters table inet {TABLE}")
        except NftError as e:
            log.error("enforcement: cannot read the table's counters: %s", e)
            return
        names = {f"p{i}": p.name for i, p in enumerate(plan.policies)}
        deltas: dict[str, int] = {}
        for obj in data:
            c = obj.get("counter")
            if c and c.get("name") in names:
                name = names[c["name"]]
                delta = c.get("packets", 0) - self._packets.get(name, 0)
                if delta > 0:
                    deltas[name] = delta
                    m.refused.labels(name).inc(delta)
                    self._packets[name] = c.get("packets", 0)
        now = self.clock()
        fresh = []
        for key, name in names.items():
            new = 0
            full = False
            for v in (4, 6):
                try:
                    sets = self.nft.json(f"list set inet {TABLE} {key}_seen{v}")
                except NftError:
                    continue
                elems = next((o["set"].get("elem", []) for o in sets if "set" in o), [])
                full = full or len(elems) >= SEEN_SIZE
                for el in elems:
                    val = el["elem"]["val"] if isinstance(el, dict) and "elem" in el else el
                    parts = val.get("concat") if isinstance(val, dict) else None
                    if not parts or len(parts) != 4:
                        continue
                    k = (name, *parts)
                    if k not in self._known:
                        self._known[k] = now
                        new += 1
                        fresh.append(Refused(name, _proto(parts[2]), parts[0], parts[1], int(parts[3])))
            if full:  # refusals go on; those beyond the set's bound have no record of their own
                m.enforcement_unrecorded.labels(name).inc(max(0, deltas.get(name, 0) - new))
                log.warning("enforcement: the refused-connections set of %s is full: refusals go on, some "
                            "without an evidence record (egress_agent_enforcement_unrecorded_total)", name)
        for k in [k for k, t in self._known.items() if now - t > 2 * int(self.options.get("seen_timeout", 300))]:
            del self._known[k]
        if fresh:
            if not self.d._enqueue([("refused", r, False) for r in fresh], {"queue_full": m.drops.labels(
                    "enforce", "queue_full")}):
                for r in fresh:  # the worker's queue is full: the refusals stand, their records are lost
                    m.enforcement_unrecorded.labels(r.policy).inc()
            self._log(fresh)

    def _log(self, fresh: list[Refused]):
        """At most `log_per_second` lines a second (burst 5x); the rest are summed in one line."""
        rate = float(self.options.get("log_per_second", 5))
        now = time.monotonic()
        self._tokens = min(rate * 5, self._tokens + (now - self._token_t) * rate)
        self._token_t = now
        for r in fresh:
            if self._tokens >= 1:
                self._tokens -= 1
                log.warning("refused %s connection %s -> %s port %d (policy %s)", _PROTO_NAMES.get(r.proto, r.proto),
                            r.src, r.dst, r.dport, r.policy)
            else:
                self._quiet += 1
        if self._quiet and self._tokens >= 1:
            log.warning("refused %d more connections (not logged one by one: log_per_second)", self._quiet)
            self._quiet = 0

    # -- evidence (the worker's thread) -------------------------------------------------------
    def record(self, r: Refused, now: float):
        """The evidence record of one refused connection (worker thread): the daemon's verdict for it,
        with the name the capture's DNS answers give its destination, where known."""
        from agent.sinks.eventlog import extra_members, json_bytes, record_body

        d = self.d
        n = d.names.name_flow(r.proto, r.src, 0, r.dst, r.dport, now) if d.names is not None else None
        j = d.pipeline.judge(Flow(r.proto, r.src, 0, r.dst, r.dport, 1, 0, now, now, "enforce", None,
                                  n.hostname if n else None, n.source if n else None, n.chain if n else ()))
        v = next((v for v in j.verdicts if v.policy == r.policy), None)
        if v is None:
            return  # the policy was removed since
        extra = extra_members({"enforcement": "refused", "process": "not known (refused before a connection "
                                                                    "existed)"})
        d._records.append(record_body(j, v, "refused", extra, json_bytes(j.flow.to_json()), d.stamp()))

    def close(self):
        if self.nft is None:
            return
        if self.applied and not self.owner and self.options.get("fail", "open") == "open":
            try:
                self.nft.run(f"delete table inet {TABLE}")
            except NftError as e:
                log.error("enforcement: cannot remove the table at stop: %s", e)
        self.nft.close()  # an owner table goes with its socket
        self.nft = None
        self.applied = False


_PROTO_NAMES = {6: "tcp", 17: "udp"}


def _proto(p) -> int:
    return {"tcp": 6, "udp": 17}.get(p, p) if isinstance(p, str) else int(p)


def _names(p) -> bool:
    """Whether names can excuse anything under the policy (allow or an exception names hosts)."""
    return any(d is not None and d.hostnames for d in (p.allow, *(e.destinations for e in p.exceptions)))


def _holds(spans, n: int) -> bool:
    from bisect import bisect_right

    i = bisect_right(spans, (n, 1 << 129)) - 1
    return i >= 0 and spans[i][0] <= n <= spans[i][1]
