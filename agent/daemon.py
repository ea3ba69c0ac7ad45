"""`egress-agent run`: the live daemon. Sources -> bounded queue -> the shared pipeline -> sinks.

Threads: one source thread (conntrack dump + events), one worker (attribution, judging, metrics,
evidence), the metrics HTTP server; the main thread owns signals: SIGHUP reloads config and
policies (a broken reload keeps the old set and flips `config_last_reload_successful` to 0),
SIGTERM/SIGINT flush and exit 0. Under systemd it sends READY, RELOADING, STOPPING and watchdog
pings. Logs go to stderr; with $JOURNAL_STREAM set each line carries a syslog priority prefix.

Sampling: 1-in-N new flows (by conntrack id, so a flow's NEW and DESTROY are kept together) and an
optional per-destination rate limit. Loss accounting (`agent.accounting`): the kernel's own count
of new egress connections (`agent.sources.kernel_count`) against what was judged, what was dropped
by reason (sampled, rate_limited, queue_full, overflow, error) and what is queued; the remainder
is `flows_unaccounted`. `sampling_ratio` is judged / kernel flows when the counter is readable.
Only egress events reach Python: a socket filter (`agent.sources.ct_filter`) drops the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict

from agent import reload_status
from agent import systemd_notify as sd
from agent.accounting import LossAccount
from agent.config import Config, load_config, with_flags
from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper
from agent.errors import UserError
from agent.flow import Outcome
from agent.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies
from agent.sinks import webconfig
from agent.sinks.eventlog import EvidenceLog, record
from agent.sinks.eventlog import Options as EvidenceOptions
from agent.sinks.metrics import Metrics

log = logging.getLogger("egress-agent")
EVIDENCE_OUTCOMES = ("violation", "indeterminate", "exempt")
_REPORTED = {Outcome(o) for o in EVIDENCE_OUTCOMES}
MAX_OPEN_FLOWS = 262144
MAX_KNOWN = 1 << 20  # flows the source remembers, so a resynchronising dump skips flows it has seen
BATCH = 4096  # events per queue item: one hand-off per netlink read, at most this many
SOURCE = "conntrack"


class _JournalFormatter(logging.Formatter):
    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        # journald reads the prefix per line: every line of a multi-line message (a reload's list
        # of problems, a traceback) must carry it, or `journalctl -p err` shows only the first.
        prefix = f"<{self.LEVELS.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging():
    h = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        h.setFormatter(_JournalFormatter("%(message)s"))
    else:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [h]
    log.setLevel(logging.INFO)
    log.propagate = False


def build_pipeline(cfg: Config, host_addresses: tuple[str, ...] = ()) -> Pipeline:
    """`host_addresses`: the host's own addresses, local like `local_nets` (a public-IP server's
    outbound flows are egress)."""
    from agent.cli import shipped_policies

    jur = Jurisdictions.load()
    policies = load_policies(cfg.policies or shipped_policies(), jur)
    scoper = Scoper(public_nets=cfg.public_nets, local_nets=tuple(cfg.local_nets) + tuple(host_addresses))
    return Pipeline(policies, jur, Locator(cfg.geoip_databases, scoper), scoper)


class RateLimit:
    """Token bucket per destination (bounded LRU of destinations)."""

    def __init__(self, rate: float, size: int = 65536):
        self.rate, self.size = rate, size
        self.buckets: OrderedDict[str, list] = OrderedDict()

    def allow(self, dst: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        b = self.buckets.get(dst)
        if b is None:
            b = self.buckets[dst] = [self.rate, now]
            if len(self.buckets) > self.size:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(dst)
            b[0] = min(self.rate, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1:
            b[0] -= 1
            return True
        return False


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, args=None):
        self.cfg = cfg
        self.config_path = config_path
        self.args = args
        self.metrics = Metrics()
        self.metrics.source(SOURCE)
        if "conntrack" not in cfg.sources:
            raise UserError("sources: the capture source names conntrack's flows; flows from capture alone "
                            "(hosts without nf_conntrack) are not built yet: run --source conntrack --source capture")
        self.host_addrs: tuple[str, ...] = ()
        if cfg.host_addresses:
            from agent.sources.host_addresses import HostAddresses

            try:
                self.host_addrs = HostAddresses(cfg.source.get("netns")).current()
            except Exception as e:  # the daemon still works from local_nets; say what is missing
                log.warning("cannot read the host's own addresses (%s): flows from a public address of this "
                            "host are not egress unless local_nets lists it", e)
        self.pipeline = build_pipeline(cfg, self.host_addrs)
        self.names = None  # NameExtractor when the capture source is on
        self._host_packed: frozenset = frozenset()
        self.web = webconfig.load(cfg.web_config)
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.rescope = threading.Event()
        self.queue: queue.Queue = queue.Queue()  # bounded by `pending` (events), see _source
        self.pending = 0
        self.pending_flows = 0  # of which flows counted for loss accounting
        self._socket_drops = 0
        self._counter_ok = True  # the last reading of the kernel's counter worked
        self.pending_lock = threading.Lock()
        self.evidence = EvidenceLog(EvidenceOptions(cfg.evidence_path, **{k: v for k, v in cfg.evidence.items()
                                                                         if k != "path"}))
        self._evidence_logged = -1e9
        self.metrics.evidence_gaps.inc(self.evidence.gaps)
        if self.evidence.gaps:
            log.warning("the previous run did not stop cleanly: wrote a gap record to %s", cfg.evidence_path)
        self.attributor = None
        if cfg.attribution:
            from agent.enrich.process import Attributor
            from agent.enrich.process import Options as AttrOptions

            self.attributor = Attributor(AttrOptions(netns=cfg.source.get("netns")))
        why = self.attribution_limit()
        self.metrics.attribution.labels("process").set(0 if why else 1)
        if why:
            log.warning("process attribution is off: %s", why)
        self.seen_new = 0
        self.kept_new = 0
        self.open: OrderedDict[int, list] = OrderedDict()
        self.threads: list[threading.Thread] = []
        self._loaded()

    def _warn_exposed(self):
        host, _ = self.cfg.listen_addr()
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if not loopback and not self.web.protected:
            log.warning("metrics are served on %s without TLS or basic auth: anyone who can reach it reads "
                        "which countries this host sends data to. Set web_config (exporter-toolkit "
                        "web-config.yml) or bind to 127.0.0.1", self.cfg.listen)

    def attribution_limit(self) -> str | None:
        if self.attributor is None:
            return "disabled in the configuration (attribution: false)"
        return self.attributor.permission()

    def status(self) -> str:
        attr = "uid only" if self.attribution_limit() else "process"
        return f"STATUS=judging with {len(self.pipeline.policies)} policies; attribution: {attr}"

    def _loaded(self):
        inbound = [p.name for p in self.pipeline.policies if "inbound" in p.directions]
        if inbound:
            # said, not silently skipped: the live source's kernel filter and flow counter cover
            # connections opened from local hosts; inbound ones are judged by `egress-agent audit`
            log.warning("policies %s judge inbound connections too; the live conntrack source judges outbound "
                        "connections only (audit captures or flow logs for inbound ones)", ", ".join(inbound))
        self.metrics.policies(self.pipeline.policies, self.pipeline.locator.provenance())
        self.metrics.jurisdictions(self.pipeline.jurisdictions)
        self.metrics.reload_success.set(1)
        self.metrics.reload_time.set(time.time())

    # -- reload -------------------------------------------------------------------------------
    def reload(self):
        sd.reloading()
        ok, message = False, ""
        try:
            cfg = with_flags(load_config(self.config_path), self.args) if self.args else load_config(self.config_path)
            pipe = build_pipeline(cfg, self.host_addrs)
            web = webconfig.load(cfg.web_config)
        except UserError as e:
            self.metrics.reload_success.set(0)
            message = str(e)
            log.error("reload failed, keeping the policies in force: %s", e)
        except Exception as e:  # a bug or an input we did not foresee: never let it take the daemon down
            self.metrics.reload_success.set(0)
            message = f"{type(e).__name__}: {e}"
            log.exception("reload failed (%s), keeping the policies in force", message)
        else:
            rescoped = pipe.scoper.tables != self.pipeline.scoper.tables
            self.pipeline, self.cfg, self.web = pipe, cfg, web
            if rescoped:
                # public_nets/local_nets changed what "egress" means: the kernel's filter and counter
                # are built from the scope table, so the source rebuilds them (and takes a new baseline)
                self.rescope.set()
            if getattr(self, "http", None):
                self.http.set_web_config(web)
            self._loaded()
            ok, message = True, f"reloaded {len(pipe.policies)} policies"
            log.info("%s", message)
        reload_status.write(ok, message)
        sd.notify("READY=1", self.status())

    # -- source thread ------------------------------------------------------------------------
    def _open_source(self, m, acct: LossAccount):
        """Open the conntrack sockets (with the kernel-side filter) and take the counter's baseline."""
        from agent.sources.conntrack import Conntrack, read_sysctl
        from agent.sources.ct_filter import program

        src = self.cfg.source
        netns = src.get("netns")
        prog = program(self.pipeline.scoper) if src.get("kernel_filter", True) else None
        ct = Conntrack(netns, prog)
        if src.get("rcvbuf"):
            import socket as _s
            ct.ev.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, int(src["rcvbuf"]))
        # the baseline: read after the event socket exists, so every flow counted from here on
        # produces an event we can receive
        if acct.kernel_base is None:
            acct.kernel_reading(self.kernel_counter.read())
        else:
            ct.dumps = 1  # a reopened socket: what its dump finds was missed, count it as recovered
        m.loss_accounting.labels(SOURCE).set(0 if acct.kernel_base is None else 1)
        if acct.kernel_base is None:
            log.warning("loss accounting is off: %s (set source.enable: true, or load "
                        "deploy/nftables/egress-agent.nft, so the kernel counts egress flows)",
                        self.kernel_counter.error)
        on = read_sysctl("net.netfilter.nf_conntrack_acct", netns) == "1"
        m.accounting.labels(SOURCE).set(1 if on else 0)
        if not on:
            log.warning("conntrack accounting is off (net.netfilter.nf_conntrack_acct=0): flows "
                        "will have no byte counts; set source.enable: true or the sysctl")
        m.source_up.labels(SOURCE).set(1)
        return ct

    def _account(self, m, acct: LossAccount, ct, kernel_now):
        """One accounting interval: socket drops, kernel growth, booking, the gauges."""
        drops_now = ct.socket_drops()
        if drops_now > self._socket_drops:
            lost = drops_now - self._socket_drops
            acct.events_lost(lost)
            m.events_lost.labels(SOURCE).inc(lost)
            m.source_errors.labels(SOURCE, "overflow").inc()
            log.warning("the kernel dropped %d conntrack events (socket buffer full); resynchronising with a "
                        "dump, flows that ended meanwhile are counted as overflow drops", lost)
            ct.needs_dump = True
        self._socket_drops = drops_now
        if kernel_now is not None:
            if not self._counter_ok:
                log.info("the kernel's egress flow counter is readable again; loss accounting resumes")
            self._counter_ok = True
            m.loss_accounting.labels(SOURCE).set(1)
            m.kernel_flows.labels(SOURCE).inc(acct.kernel_reading(kernel_now))
        elif acct.kernel_base is not None and self._counter_ok:
            # the table was deleted or replaced under us: say so instead of exporting a stale gauge
            self._counter_ok = False
            m.loss_accounting.labels(SOURCE).set(0)
            log.warning("the kernel's egress flow counter can no longer be read (%s); loss accounting is off "
                        "until it returns", self.kernel_counter.error)
        booked = acct.settle()
        if booked:
            m.drops.labels(SOURCE, "overflow").inc(booked)
        if acct.kernel_base is not None and self._counter_ok:
            m.unaccounted.labels(SOURCE).set(acct.unaccounted)
            if acct.kernel:
                judged = m.judged_flows.labels(SOURCE)._value.get()
                m.sampling.labels(SOURCE).set(min(1.0, judged / acct.kernel))
        elif self.seen_new:
            m.sampling.labels(SOURCE).set(self.kept_new / self.seen_new)
        m.queued.labels(SOURCE).set(self.pending_flows)

    def _source(self):
        from agent.sources.kernel_count import KernelCounter

        src = self.cfg.source
        netns = src.get("netns")
        one_in = max(1, int(self.cfg.sampling.get("one_in", 1)))
        limiter = RateLimit(float(self.cfg.sampling.get("per_destination_per_second", 0)))
        every = float(src.get("accounting_interval", 1.0))
        m = self.metrics
        events = {k: m.source_events.labels(SOURCE, k) for k in m.EVENTS}
        drops = {k: m.drops.labels(SOURCE, k) for k in m.DROP_REASONS}
        self.kernel_counter = KernelCounter(netns)
        acct = self.loss = LossAccount()
        # Flows are identified by (conntrack id, proto, src, sport, dst, dport), `CtEntry[:6]`: the
        # 32-bit id alone collides (two live flows share one in ~1 of 10^4 pairs at 10^5 flows,
        # measured: bench_live lost one flow that way before this key).
        known: dict[tuple, None] = {}  # egress flows seen and still open; a resync skips them
        ct = None
        next_tick = 0.0
        while not self.stop.is_set():
            try:
                if self.rescope.is_set() and ct is not None:
                    self.rescope.clear()
                    if src.get("enable"):
                        from agent.sources.conntrack import enable_tracking

                        enable_tracking(netns, self.pipeline.scoper)
                    log.info("public/local networks changed: the kernel's event filter and egress counter were "
                             "rebuilt from the new scope table")
                    ct.close()
                    ct = None
                    acct.kernel_base = None  # a new counter (or new sets): a new baseline, totals kept
                if ct is None:
                    ct = self._open_source(m, acct)
                    self._socket_drops = ct.socket_drops()
                    dumped = 0
                    first_dump = True
                kernel_now = None
                tick = time.monotonic() >= next_tick
                if tick:
                    next_tick = time.monotonic() + every
                    # read the kernel first, then drain the socket: every flow in this reading has
                    # its event delivered (or dropped, which the socket's drop counter shows) by then
                    kernel_now = self.kernel_counter.read() if acct.kernel_base is not None else None
                scope = self.pipeline.scoper
                batch = []
                for kind, e in ct.events(min(0.5, every)):
                    if len(batch) >= BATCH:
                        self._enqueue(batch, drops)
                        batch = []
                    if kind == "destroy":
                        events["destroy"].inc()
                        if e[:6] in known:
                            del known[e[:6]]
                            batch.append((kind, e, False))
                        continue
                    events["resync" if kind == "resync" else kind].inc()
                    if kind == "dump":
                        dumped += 1
                    if e[:6] in known or not scope.is_egress(e.src, e.dst):
                        continue
                    known[e[:6]] = None
                    if len(known) > MAX_KNOWN:
                        del known[next(iter(known))]
                    counted = kind != "dump" and scope.accountable(e.src) and scope.accountable(e.dst)
                    if counted:
                        if kind == "new":
                            acct.arrived += 1
                        else:
                            acct.recovered += 1
                            m.recovered.labels(SOURCE).inc()
                    self.seen_new += 1
                    if one_in > 1 and (e.ct_id * 2654435761) % 4294967296 % one_in:
                        drops["sampled"].inc(counted)
                        continue
                    if not limiter.allow(e.dst, time.monotonic()):
                        drops["rate_limited"].inc(counted)
                        continue
                    self.kept_new += 1
                    batch.append((kind, e, counted))
                if batch:
                    self._enqueue(batch, drops)
                if ct.needs_dump and ct.overflows:
                    acct.resync_pending = True  # an ENOBUFS: the dump runs at the next events() call
                elif not ct.needs_dump:
                    acct.resync_pending = False
                if tick:
                    self._account(m, acct, ct, kernel_now)
                tracking = dumped > 0 or self.seen_new > 0
                m.tracking.labels(SOURCE).set(1 if tracking else 0)
                if first_dump:
                    first_dump = False
                    if not tracking:
                        # An empty table is normal at boot, before any traffic; only say so loudly when
                        # nothing in the kernel needs conntrack (then no flow will ever show up).
                        rule = _tracking_rule_present(netns)
                        (log.info if rule else log.warning)(
                            "the conntrack table%s is empty%s", f" of netns {netns}" if netns else "",
                            " (normal before any traffic)" if rule else
                            ": the kernel may not be tracking connections (no nftables rule needs conntrack). "
                            "Load deploy/nftables/egress-agent.nft, or set source.enable: true")
            except UserError as e:
                m.source_up.labels(SOURCE).set(0)
                m.source_errors.labels(SOURCE, "setup").inc()
                log.error("conntrack source: %s", e)
                self.stop.wait(5)
            except Exception as e:  # OSError, or a bug: never let the source thread die
                m.source_up.labels(SOURCE).set(0)
                m.source_errors.labels(SOURCE, "io").inc()
                (log.error if isinstance(e, OSError) else log.exception)("conntrack source failed (%s); reopening", e)
                if ct is not None:
                    ct.close()
                ct = None
                self.stop.wait(1)
        if ct is not None:
            ct.close()
        m.source_up.labels(SOURCE).set(0)

    def _enqueue(self, batch: list, drops: dict):
        """Hand a batch to the worker. The bound is in events (`pending`, what the worker has not
        taken). A dump batch waits for room (the table is finite; events meanwhile queue in the
        kernel, and an overflow there is resynchronised); a batch of live events that does not fit
        is dropped, its flows counted as queue_full."""
        blocking = batch[0][0] in ("dump", "resync")
        flows = sum(1 for _k, _e, counted in batch if counted)
        while True:
            with self.pending_lock:
                fits = self.pending + len(batch) <= self.cfg.queue_size or self.pending == 0
                if fits:
                    self.pending += len(batch)
                    self.pending_flows += flows
            if fits:
                self.queue.put((batch, time.time()))
                return
            if not blocking or self.stop.is_set():
                drops["queue_full"].inc(flows)
                return
            self.stop.wait(0.01)

    # -- worker -------------------------------------------------------------------------------
    def _worker(self):
        last_geo = time.monotonic()
        judged = self.metrics.judged_flows.labels(SOURCE)
        errors = self.metrics.drops.labels(SOURCE, "error")
        while not (self.stop.is_set() and self.queue.empty()):
            try:
                batch, now = self.queue.get(timeout=0.25)
            except queue.Empty:
                batch = None
            if time.monotonic() - last_geo >= self.cfg.geoip_check_interval:
                last_geo = time.monotonic()
                self._check_geoip()
            if batch is None:
                continue
            if self.names is not None:
                # give the capture source time to see the flow's TLS or QUIC hello (one round trip
                # after the SYN that made the conntrack entry); FIFO, so one wait per batch at most
                delay = now + self.name_wait - time.time()
                if delay > 0:
                    self.stop.wait(delay)
            flows = 0
            for kind, e, counted in batch:
                flows += counted
                try:
                    self._handle(kind, e, now)
                except Exception:  # a bug must not stop judging the other flows
                    log.exception("could not judge a conntrack event")
                    self.metrics.source_errors.labels(SOURCE, "judge").inc()
                    if counted:
                        errors.inc()
                else:
                    if counted:
                        judged.inc()
            self.metrics.flush()
            with self.pending_lock:
                self.pending -= len(batch)
                self.pending_flows -= flows

    def _check_geoip(self):
        loc = self.pipeline.locator
        if loc.refresh():
            self.pipeline.clear()
            log.info("GeoIP database changed on disk; reopened, cache dropped")
            self.metrics.policies(self.pipeline.policies, loc.provenance())
            self.metrics.geoip_ok.set(1)
        elif loc.refresh_error:
            self.metrics.geoip_ok.set(0)
            log.error("GeoIP database changed on disk but cannot be opened; still judging with the "
                      "previous one, retrying in %g s: %s", self.cfg.geoip_check_interval, loc.refresh_error)

    def _handle(self, kind: str, e, now: float):
        """Judge a new flow (the source has checked it is egress), or close one on DESTROY."""
        pipe = self.pipeline
        if kind != "destroy":
            if e[:6] in self.open:
                return  # seen already
            flow = e.flow(now)
            if self.names is not None:
                n = self.names.name_flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                                         flow.first_seen or now)
                if n is not None:
                    flow = dataclasses.replace(flow, hostname=n.hostname, hostname_source=n.source,
                                               hostname_chain=n.chain)
                    self.metrics.names.labels(n.source).inc()
            who = self.attributor.who(flow) if self.attributor else None
            if who is not None:
                flow = dataclasses.replace(flow, who=who)
            j = pipe.judge(flow)
            self.metrics.judged(j)
            self._evidence(j, "new" if kind == "new" else "open", e)
            self.open[e[:6]] = [j, e.bytes]
            if len(self.open) > MAX_OPEN_FLOWS:
                self.open.popitem(last=False)
                self.metrics.state_evicted.labels(SOURCE).inc()
            return
        st = self.open.pop(e[:6], None)
        if st is None:
            return  # sampled out, or forgotten (state_evicted)
        j, counted = st
        delta = max(0, e.bytes - counted)
        flow = dataclasses.replace(j.flow, packets=e.packets, bytes=e.bytes, last_seen=now)
        ended = j.with_flow(flow)
        if delta:
            self.metrics.judged(j.with_flow(dataclasses.replace(flow, bytes=delta)), bytes_only=True)
        self._evidence(ended, "end", e)

    def _evidence(self, j, event: str, e):
        extra = {"conntrack_id": e.ct_id}
        if e.nat_dst or e.nat_src:
            extra["nat"] = {"dst": e.nat_dst, "src": e.nat_src}
        ev = self.evidence
        for v in j.outcomes:
            if v.outcome in _REPORTED:
                gaps = ev.gaps
                try:
                    ev.write(record(j, v, event, extra))  # record() names this flow's destination
                    self.metrics.evidence_lines.inc()
                except OSError as err:
                    # counted per line; logged once a minute, not per line (a full disk would flood the journal)
                    self.metrics.evidence_errors.inc()
                    now = time.monotonic()
                    if now - self._evidence_logged >= 60:
                        self._evidence_logged = now
                        log.error("evidence log %s: %s; %d line(s) lost so far (counted in "
                                  "egress_agent_evidence_errors_total; a gap record follows when writing works "
                                  "again)", self.cfg.evidence_path, err.strerror or err, ev.lost_lines)
                if ev.gaps != gaps:
                    self.metrics.evidence_gaps.inc(ev.gaps - gaps)
                    log.warning("evidence log writable again; wrote a gap record")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self):
        from agent.sinks.http import MetricsServer

        host, port = self.cfg.listen_addr()
        try:
            self.http = MetricsServer(self.metrics.registry, host, port, self.web,
                                      rejected=self.metrics.http_rejected).start()
        except OSError as e:
            raise UserError(f"listen {self.cfg.listen}: {e.strerror}") from None
        self._warn_exposed()
        if self.cfg.source.get("enable"):
            from agent.sources.conntrack import enable_tracking

            for done in enable_tracking(self.cfg.source.get("netns"), self.pipeline.scoper):
                log.info("enabled %s", done)
        targets = [(self._source, "source"), (self._worker, "worker")]
        if "capture" in self.cfg.sources:
            capture = self._open_capture()
            targets.append((lambda: capture.run(self.stop), "capture"))
        if self.cfg.host_addresses:
            from agent.sources.host_addresses import HostAddresses

            hosts = HostAddresses(self.cfg.source.get("netns"))
            targets.append((lambda: hosts.watch(self._host_addresses_changed, self.stop), "host-addresses"))
        for target, name in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        log.info("egress-agent running: %d policies, metrics on http://%s/metrics, evidence in %s",
                 len(self.pipeline.policies), self.cfg.listen, self.cfg.evidence_path)

    def _open_capture(self):
        from agent.names.extract import NameExtractor, packed
        from agent.sources.capture import CaptureNames

        cap = self.cfg.capture
        self.name_wait = float(cap.get("name_wait", 0.5))
        self._host_packed = frozenset(packed(a) for a in self.host_addrs)
        # every address of this host is one DNS client: a stub resolver on loopback answers for all
        host_id, loop4, loop6 = b"host", packed("127.0.0.1")[:13], packed("::1")
        client_of = lambda a: host_id if a in self._host_packed or a[:13] == loop4 or a == loop6 else a  # noqa: E731
        names = NameExtractor(grace=float(cap.get("dns_grace", 30)), client_of=client_of)
        self.metrics.source("capture")
        capture = CaptureNames(names, cap.get("interfaces") or (), cap.get("tls_ports") or (443,),
                               self.cfg.source.get("netns"), self.metrics).open()
        self.names = names
        return capture

    def _host_addresses_changed(self, addrs: tuple[str, ...]):
        from agent.names.extract import packed

        log.info("the host's addresses changed (now %s); rebuilding the scope table", ", ".join(addrs))
        self.host_addrs = addrs
        self._host_packed = frozenset(packed(a) for a in addrs)
        self.reload_requested.set()

    def shutdown(self):
        sd.notify("STOPPING=1")
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.evidence.close()
        if self.attributor:
            self.attributor.close()
        if getattr(self, "http", None):
            self.http.stop()


def _tracking_rule_present(netns: str | None) -> bool:
    """True when some nftables rule refers to conntrack state (so the kernel tracks connections)."""
    import subprocess

    pre = ["ip", "netns", "exec", netns] if netns else []
    try:
        r = subprocess.run(pre + ["nft", "list", "ruleset"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and " ct state " in r.stdout


def files_signature(*paths) -> tuple:
    """What changes when a policy folder or config file is replaced (ConfigMap updates swap a symlink)."""
    sig = []
    for p in paths:
        if not p:
            continue
        try:
            entries = [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        except OSError:
            entries = [p]
        for e in entries:
            try:
                st = os.stat(e)
                sig.append((e, os.path.realpath(e), st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((e, None))
    return tuple(sig)


def run_daemon(args) -> int:
    setup_logging()
    # The source thread makes a system call per kernel event and the worker one per evidence line;
    # each returns needing the GIL back. With CPython's default 5 ms switch interval the CPU-bound
    # thread holds it that long every time (the "convoy" effect): bench_live measured ~30% more
    # flows per CPU-second at 1 ms.
    sys.setswitchinterval(0.001)
    cfg = with_flags(load_config(args.config), args)
    d = Daemon(cfg, args.config, args)
    signal.signal(signal.SIGHUP, lambda *_: d.reload_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: d.stop.set())
    signal.signal(signal.SIGINT, lambda *_: d.stop.set())
    d.start()
    reload_status.write(True, "started")
    sd.notify("READY=1", d.status())
    wd = sd.watchdog_interval()
    watch = lambda: files_signature(d.cfg.policies, args.config)  # noqa: E731
    last_sig, last_check = watch(), time.monotonic()
    reloader: threading.Thread | None = None
    while not d.stop.is_set():
        d.stop.wait(min(wd or 1.0, 1.0))
        if wd:
            # pinged from this loop, not from the reload: a long reload (thousands of policies)
            # runs on its own thread and the watchdog keeps hearing from us meanwhile
            sd.notify("WATCHDOG=1")
        every = d.cfg.reload_check_interval
        if every and time.monotonic() - last_check >= every:
            last_check = time.monotonic()
            sig = watch()
            if sig != last_sig:
                last_sig = sig
                log.info("policy or config files changed on disk; reloading")
                d.reload_requested.set()
        if reloader is not None and not reloader.is_alive():
            reloader = None
        if d.reload_requested.is_set() and reloader is None:
            d.reload_requested.clear()  # a SIGHUP during this reload is served by the next one
            reloader = threading.Thread(target=d.reload, name="reload", daemon=True)
            reloader.start()
        if not all(t.is_alive() for t in d.threads) and not d.stop.is_set():
            log.error("a worker thread died; exiting so the service manager restarts us")
            d.shutdown()
            return 1
    log.info("stopping: flushing evidence")
    d.shutdown()
    return 0
