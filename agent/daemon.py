"""`egress-agent run`: the live daemon. Sources -> bounded queue -> the shared pipeline -> sinks.

Threads: one per live source (`sources:`, plugins found by `agent.sources.live`: conntrack's dump
and events, the packet-capture source), one worker (names, attribution, judging, metrics,
evidence), one following the host's own addresses, the metrics HTTP server; the main thread owns
signals: SIGHUP reloads config and
policies (a broken reload keeps the old set and flips `config_last_reload_successful` to 0),
SIGTERM/SIGINT flush and exit 0. Under systemd it sends READY, RELOADING, STOPPING and watchdog
pings. Logs go to stderr; with $JOURNAL_STREAM set each line carries a syslog priority prefix.

Sampling, loss accounting and kernel-side filtering belong to each source (see
`agent.sources.conntrack.source` and `agent.sources.capture.source`); the daemon owns the bounded queue
between sources and worker, whose overflow each source counts as queue_full drops. With a
recipient register loaded, flows are counted per recipient and each undeclared one is logged once.
"""

from __future__ import annotations

import gc
import json
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
from agent.config import Config, load_config, with_flags
from agent.daemon_log import setup_logging
from agent.errors import UserError
from agent.fileio import files_signature
from agent.flow import Flow, Outcome, iso_time
from agent.judge.build import build_pipeline  # noqa: F401 - re-exported: tests and tools build one as the daemon does
from agent.judge.fastlane import FastLane, Opened
from agent.policy.model import effective_mode
from agent.policy.recipients import fallback_recipient
from agent.sinks import webconfig
from agent.sinks.eventlog import EvidenceLog, extra_members, json_bytes, record_body
from agent.sinks.eventlog import Options as EvidenceOptions
from agent.sinks.metrics import Metrics
from agent.sources.netflow.source import NetflowEntry
from agent.threadname import named

log = logging.getLogger("egress-agent")
EVIDENCE_OUTCOMES = ("violation", "indeterminate", "exempt")
_REPORTED = {Outcome(o) for o in EVIDENCE_OUTCOMES}
MAX_OPEN_FLOWS = 262144
_ASK = object()  # `_handle`: look the process up (the caller did not)
SOURCE = "conntrack"
MAX_UNDECLARED = 10000  # distinct undeclared recipients remembered (and logged once each)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, args=None):
        self.cfg = cfg
        self.config_path = config_path
        self.args = args
        self.metrics = Metrics()
        self.host_addrs: tuple[str, ...] = ()
        if cfg.host_addresses:
            from agent.enrich.host_addresses import HostAddresses

            try:
                self.host_addrs = HostAddresses(cfg.source.get("netns")).current()
            except Exception as e:  # the daemon still works from local_nets; say what is missing
                log.warning("cannot read the host's own addresses (%s): flows from a public address of this "
                            "host are not egress unless local_nets lists it", e)
        self.pipeline = build_pipeline(cfg, self.host_addrs)
        # undeclared recipients already named, kept beside the evidence so a restart does not name
        # (and alert on) them again
        self._undeclared_path = os.path.join(os.path.dirname(cfg.evidence_path) or ".", "undeclared-recipients.json")
        self._undeclared: set[str] = self._load_undeclared()
        self.names = None  # NameExtractor when the capture source is on (it sets this and name_wait)
        self.name_wait = 0.0
        self._host_packed: frozenset = frozenset()
        self.web = webconfig.load(cfg.web_config)
        for w in self.web.warnings:
            log.warning("%s", w)
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.rescope = threading.Event()
        self.queue: queue.Queue = queue.Queue()  # bounded by `pending` (events), see _source
        self.pending = 0
        self.pending_flows = 0  # of which flows counted for loss accounting
        self.pending_lock = threading.Lock()
        self.evidence = EvidenceLog(EvidenceOptions(cfg.evidence_path, **{k: v for k, v in cfg.evidence.items()
                                                                         if k != "path"}))
        self._evidence_logged = -1e9
        self._stamp = (0.0, b"")  # (time, its RFC 3339 text as JSON) of the last evidence records made
        self.reported_outcomes = _REPORTED
        self.fast = FastLane(self, MAX_OPEN_FLOWS, SOURCE)
        self._records: list[bytes] = []  # evidence records of the batch being judged (see _write_evidence)
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
        self._feeding: list[threading.Thread] = []  # the sources' threads
        from agent.enforce.enforcer import Enforcer

        self.enforcer = Enforcer(self)
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
            # the sources then keep connections public peers open to local hosts as well (their kernel
            # filter, scope table and counter follow `Pipeline.inbound`), judged by the peer's location
            log.info("policies %s judge inbound connections too: connections public peers open to local "
                     "hosts are judged as well", ", ".join(inbound))
        self.metrics.policies(self.pipeline.policies, self.pipeline.locator.provenance())
        self.metrics.enforcement(self.pipeline.policies, self.cfg.enforce)
        for mode, words in (("dry-run", "violations count as would-refuse; no traffic touched"),
                            ("refuse", "new connections they forbid are refused in the kernel")):
            names = [p.name for p in self.pipeline.policies if effective_mode(p.enforce, self.cfg.enforce) == mode]
            if names:
                log.info("enforcement %s on for policies %s (%s)", mode, ", ".join(names), words)
        if capped := [p.name for p in self.pipeline.policies
                      if effective_mode(p.enforce, self.cfg.enforce) != p.enforce]:
            log.info("policies %s ask for more enforcement than the host's switch (%s) allows", ", ".join(capped),
                     self.cfg.enforce)
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
            for w in web.warnings:
                log.warning("%s", w)
        except UserError as e:
            self.metrics.reload_success.set(0)
            message = str(e)
            log.error("reload failed, keeping the policies in force: %s", e)
        except Exception as e:  # a bug or an input we did not foresee: never let it take the daemon down
            self.metrics.reload_success.set(0)
            message = f"{type(e).__name__}: {e}"
            log.exception("reload failed (%s), keeping the policies in force", message)
        else:
            # what "egress" (and, with inbound policies, "inbound") means changed
            rescoped = pipe.scoper.tables != self.pipeline.scoper.tables or pipe.inbound != self.pipeline.inbound
            self.pipeline, self.cfg, self.web = pipe, cfg, web
            if rescoped:
                # public_nets/local_nets changed what "egress" means: the kernel's filter and counter
                # are built from the scope table, so the source rebuilds them (and takes a new baseline)
                self.rescope.set()
            if getattr(self, "http", None):
                self.http.set_web_config(web)
            self._loaded()
            self.enforcer.request("reload")
            ok, message = True, f"reloaded {len(pipe.policies)} policies"
            log.info("%s", message)
        reload_status.write(ok, message)
        sd.notify("READY=1", self.status())

    # -- source thread ------------------------------------------------------------------------
    def _enqueue(self, batch: list, drops: dict):
        """Hand a batch to the worker. The bound is in events (`pending`, what the worker has not
        taken). A dump batch waits for room (the table is finite; events meanwhile queue in the
        kernel, and an overflow there is resynchronised); a batch of live events that does not fit
        is dropped, its flows counted as queue_full. True when the batch was queued."""
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
                return True
            if not blocking or self.stop.is_set():
                drops["queue_full"].inc(flows)
                return False
            self.stop.wait(0.01)

    # -- worker -------------------------------------------------------------------------------
    def _worker(self):
        last_geo = time.monotonic()
        # "seen" items come from a source that only sees flows begin (capture), "flow" items from the
        # collector (the entry names netflow or sflow); the rest from conntrack
        judged = {k: self.metrics.judged_flows.labels(k) for k in (SOURCE, "capture")}
        errors = {k: self.metrics.drops.labels(k, "error") for k in (SOURCE, "capture")}
        last_flush = 0.0
        # at stop: what is queued is judged, and so is what the sources hand over as they end (the
        # collector's last connections and their final counters)
        while not (self.stop.is_set() and self.queue.empty() and not any(t.is_alive() for t in self._feeding)):
            try:
                batch, now = self.queue.get(timeout=0.25)
            except queue.Empty:
                batch = None
                self.metrics.flush()  # idle: nothing gathered waits for the next batch
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
            done = dict.fromkeys(judged, 0)  # judged flows by source, added to the counters once per batch
            fast = self.fast.new if FastLane.usable(self) else None
            today = int(time.time() // 86400)
            if self.attributor is not None:  # every new flow's socket asked about in one go
                try:
                    self.attributor.prefetch([e for kind, e, _ in batch if kind == "new" and e[:6] not in self.open])
                except Exception:  # a bug here must not stop judging: each flow is then asked alone
                    log.exception("could not ask about a batch's sockets at once")
            for kind, e, counted in batch:
                flows += counted
                label = "capture" if kind == "seen" else SOURCE if type(e) is not NetflowEntry else e.collector
                if label not in judged:
                    judged[label], errors[label] = self.metrics.judged_flows.labels(label), \
                        self.metrics.drops.labels(label, "error")
                    done[label] = 0
                try:
                    self._dispatch(kind, e, now, today, fast)
                except Exception:  # a bug must not stop judging the other flows
                    log.exception("could not judge a %s event", label)
                    self.metrics.source_errors.labels(label, "judge").inc()
                    if counted:
                        errors[label].inc()
                else:
                    done[label] += counted
            for label, n in done.items():
                if n:
                    judged[label].inc(n)
            self._write_evidence()
            # the counters by policy and country reach Prometheus every 50 ms under load (each flush
            # takes a lock per label set), and at once when the queue runs empty
            if self.queue.empty() or time.monotonic() - last_flush >= 0.05:
                self.metrics.flush()
                last_flush = time.monotonic()
            with self.pending_lock:
                self.pending -= len(batch)
                self.pending_flows -= flows

    def _check_geoip(self):
        loc = self.pipeline.locator
        if loc.refresh():
            self.pipeline.clear()
            self.fast.clear()
            log.info("GeoIP database changed on disk; reopened, cache dropped")
            self.enforcer.request("a new GeoIP database")
            self.metrics.policies(self.pipeline.policies, loc.provenance())
            self.metrics.geoip_ok.set(1)
        elif loc.refresh_error:
            self.metrics.geoip_ok.set(0)
            log.error("GeoIP database changed on disk but cannot be opened; still judging with the "
                      "previous one, retrying in %g s: %s", self.cfg.geoip_check_interval, loc.refresh_error)

    def _dispatch(self, kind: str, e, now: float, today: int, fast):
        """One event: the fast lane (`fast`, FastLane.new or None) when it takes it, else `_handle`. The
        process behind a new flow is looked up once, for whichever lane judges it; a router's flow has none."""
        if kind == "flow":  # a collector's connection: who opened it is read in its exporter's scope
            if e.inbound or fast is None:
                return self._handle(kind, e, now, None, inbound=e.inbound)
        elif kind == "refused":
            return self.enforcer.record(e, now)
        elif kind != "new" or fast is None:
            return self._handle(kind, e, now)
        elif self.pipeline.inbound and self.pipeline.scoper.is_egress(e.dst, e.src):
            return self._handle(kind, e, now, inbound=True)  # the full path: judged by the peer's location
        who = None
        if self.attributor is not None and kind == "new":
            if e[:6] in self.open:
                return  # seen already: no lookup
            who = self.attributor.who(e)  # reads proto, src, sport, dst, dport, as of a Flow
        if not fast(e, now, today, who):
            self._handle(kind, e, now, who, inbound=False)

    def _handle(self, kind: str, e, now: float, who=_ASK, inbound: bool | None = None):
        """Judge a new flow (egress, or inbound with an inbound policy), or close one on DESTROY.
        `who`: its process, `inbound`: whether a public peer opened it, when the caller knows."""
        pipe = self.pipeline
        if kind != "destroy":
            if e[:6] in self.open:
                return  # seen already
            flow = e.flow(now)
            n = None
            # the original direction is who opened it: a public peer's connection to a local host is
            # inbound (the sources keep those only while some policy judges them)
            if inbound is None:
                inbound = pipe.inbound and pipe.scoper.is_egress(flow.dst, flow.src)
            if inbound:
                if who is _ASK:  # the local socket is the accepted one: its tuple reversed
                    who = self.attributor.who(Flow(flow.proto, flow.dst, flow.dport, flow.src, flow.sport, 0, 0)) \
                        if self.attributor else None
            elif self.names is not None:
                n = self.names.name_flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                                         flow.first_seen or now)
                if n is not None:
                    self.metrics.names.labels(n.source).inc()
            if who is _ASK:
                who = self.attributor.who(flow) if self.attributor else None
            if n is not None or who is not None:  # built once, directly: replace() costs ~3x
                f = flow
                flow = Flow(f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes, f.first_seen, f.last_seen,
                            f.source, who if who is not None else f.who, n.hostname if n else f.hostname,
                            n.source if n else f.hostname_source, n.chain if n else f.hostname_chain)
            j = pipe.judge(flow, inbound=inbound)
            self.metrics.judged(j)
            if pipe.register is not None and not inbound:
                self._recipient(j)
            reported = self._evidence(j, "open" if kind in ("dump", "resync") else "new", e, kind != "seen")
            if kind == "seen":
                return  # its source never sees it end: nothing to keep
            self.open[e[:6]] = [j, e.bytes, reported]
            if len(self.open) > MAX_OPEN_FLOWS:
                self.open.popitem(last=False)
                self.metrics.state_evicted.labels(SOURCE).inc()
            return
        st = self.open.pop(e[:6], None)
        if st is None:
            return  # sampled out, or forgotten (state_evicted)
        if type(st[0]) is Opened:  # judged in the fast lane
            self.fast.end(st, e, now)
            return
        j, counted, reported = st
        delta = max(0, e.bytes - counted)
        if delta:
            self.metrics.judged(j, bytes_only=True, nbytes=delta)
        if not reported:
            return  # no verdict of this flow is recorded: no `end` record either
        f = j.flow  # the flow at its end: final counters (a Flow built directly: replace() costs ~3x)
        both = (e.opened_by, e.packets_reply, e.bytes_reply, e.flags, e.flags_reply) if type(e) is NetflowEntry else ()
        ended = j.with_flow(Flow(f.proto, f.src, f.sport, f.dst, f.dport, e.packets, e.bytes, f.first_seen, now,
                                 f.source, f.who, f.hostname, f.hostname_source, f.hostname_chain, *both))
        self._evidence(ended, "end", e)

    def _recipient(self, j):
        """Count the flow under its recipient; name each undeclared recipient once (in the log)."""
        if j.recipient is not None:
            self.metrics.recipient_flows.labels(j.recipient.id).inc()
            return
        self.metrics.recipient_flows.labels("undeclared").inc()
        key = fallback_recipient(j.flow, j.location)
        if key not in self._undeclared:
            if len(self._undeclared) >= MAX_UNDECLARED:
                return  # memory stays bounded; recipient_flows{undeclared} still counts every flow
            self._undeclared.add(key)
            self.metrics.undeclared_recipients.inc()
            log.warning("undeclared recipient %s: flow to %s (%s) matches no recipient of the register",
                        key, j.flow.dst, j.flow.hostname or "no name")
            self._save_undeclared()

    def _load_undeclared(self) -> set[str]:
        try:
            with open(self._undeclared_path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): undeclared recipients seen before this start will be named again",
                        self._undeclared_path, e)
            return set()
        if not isinstance(data, list):
            return set()
        return {k for k in data[:MAX_UNDECLARED] if isinstance(k, str)}

    def _save_undeclared(self):
        """Atomic replace (temporary file, rename); a failure is logged, never fatal."""
        tmp = f"{self._undeclared_path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(sorted(self._undeclared), f)
            os.replace(tmp, self._undeclared_path)
        except OSError as e:
            log.warning("cannot write %s (%s): undeclared recipients will be named again after a restart",
                        self._undeclared_path, e)

    def _evidence(self, j, event: str, e, tracked: bool = True) -> bool:
        """Make the records of a flow's reported verdicts; they are written with the rest of the
        batch by `_write_evidence`. False when it has none."""
        reported = [v for v in j.outcomes if v.outcome in _REPORTED]
        if not reported:
            return False
        extra = (e.ids() if type(e) is NetflowEntry else {"conntrack_id": e.ct_id}) if tracked else {}
        if e.nat_dst or e.nat_src:
            extra["nat"] = {"dst": e.nat_dst, "src": e.nat_src}
        extra = extra_members(extra)
        flow = json_bytes(j.flow.to_json())
        now = self.stamp()
        for v in reported:  # the record names this flow's destination
            self._records.append(record_body(j, v, event, extra, flow, now))
        return True

    def stamp(self) -> bytes:
        """The time of evidence records made now, as JSON; records made within a millisecond share it."""
        t = time.time()
        if t - self._stamp[0] >= 0.001:
            self._stamp = (t, json_bytes(iso_time(t)))
        return self._stamp[1]

    def _write_evidence(self):
        """Write the batch's evidence records (one system call when all is well); count what was
        lost, per line."""
        recs, self._records = self._records, []
        if not recs:
            return
        ev = self.evidence
        gaps = ev.gaps
        written, lost = ev.write_many(recs)
        self.metrics.evidence_lines.inc(written)
        if lost:
            # counted per line; logged once a minute, not per line (a full disk would flood the journal)
            self.metrics.evidence_errors.inc(len(lost))
            now = time.monotonic()
            if now - self._evidence_logged >= 60:
                self._evidence_logged = now
                err = lost[-1]
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
                                      rejected=self.metrics.http_rejected,
                                      auth_refused=self.metrics.http_auth_refused).start()
        except OSError as e:
            raise UserError(f"listen {self.cfg.listen}: {e.strerror}") from None
        self._warn_exposed()
        from agent.sources import live

        # open every source first: a set-up error (exit 2) must come before any thread runs
        self.sources = [live.build(name, self).open() for name in self.cfg.sources]
        if self.names is not None:  # DNS answers the capture believes open allow-by-name refuse sets
            self.names.on_answer = self.enforcer.dns_answer
        targets = [(self._worker, "worker"), (lambda: self.enforcer.run(self.stop), "enforce")]
        for src in self.sources:
            targets.append((lambda s=src: s.run(self.stop), f"source-{src.name}"))
        if self.cfg.host_addresses:
            from agent.enrich.host_addresses import HostAddresses

            hosts = HostAddresses(self.cfg.source.get("netns"))
            targets.append((lambda: hosts.watch(self._host_addresses_changed, self.stop), "host-addresses"))
        for target, name in targets:
            t = threading.Thread(target=named(target, f"ea-{name}"), name=name, daemon=True)
            t.start()
            self.threads.append(t)
            if name.startswith("source-"):
                self._feeding.append(t)
        self.enforcer.wait_ready()  # a first build that fails is exit 2: never run believing we refuse
        log.info("egress-agent running: %d policies, metrics on http://%s/metrics, evidence in %s",
                 len(self.pipeline.policies), self.cfg.listen, self.cfg.evidence_path)

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


def run_daemon(args) -> int:
    setup_logging()
    # The source thread makes a system call per kernel event and the worker one per evidence line;
    # each returns needing the GIL back. With CPython's default 5 ms switch interval the CPU-bound
    # thread holds it that long every time (the "convoy" effect): bench_live measured ~30% more
    # flows per CPU-second at 1 ms.
    sys.setswitchinterval(0.001)
    # Full (oldest-generation) collections walk every live container: the bounded caches (addresses,
    # locations, verdicts) and the open-flow table, about a million objects under load, whose churn
    # triggers a full walk every ~70,000 allocations by default. perf showed 25-30% of the agent's
    # CPU in the collector at 20,000 flows/s; bench_live: ~20k -> ~25k flows per CPU-second with
    # full collections 100x rarer. The young generations keep their defaults, so short-lived cycles
    # (exception tracebacks) are still collected at once; an old one waits for the next full walk,
    # every ~7 million allocations (seconds under load; an idle agent makes few of either).
    gc.set_threshold(700, 10, 1000)
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
            reloader = threading.Thread(target=named(d.reload, "ea-reload"), name="reload", daemon=True)
            reloader.start()
        if not all(t.is_alive() for t in d.threads) and not d.stop.is_set():
            log.error("a worker thread died; exiting so the service manager restarts us")
            d.shutdown()
            return 1
    log.info("stopping: flushing evidence")
    d.shutdown()
    return 0
