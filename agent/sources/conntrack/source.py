"""The conntrack live source: the daemon's flows from Linux connection tracking, with loss accounting.

Implements the live-source interface (`agent/sources/live.py`): `open()` does the optional
`enable` step (nftables rule, sysctls) and may raise UserError; `run(stop)` dumps the table, then
follows NEW and DESTROY events until `stop` is set, handing batches to the daemon's queue
(`Daemon._enqueue`), and never raises. Each accounting interval it reads the kernel's egress flow
counter (`kernel_count.py`) and the socket's drop counter and books the difference
(`agent/accounting.py`), so every flow the kernel saw is judged, dropped for a stated reason,
queued, or shown as unaccounted.

Which flows: egress ones (a local source, a public destination, in the original direction), and,
while some policy judges inbound connections (`Pipeline.inbound`), inbound ones too (a public peer
opened it to a local host; the daemon judges them by the peer's location). The kernel's filter, the
C reader's scope table and the nftables counter follow that setting through reloads; inbound flows
enter the books only when the counter counts them (the table `source.enable` installs does).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from agent.accounting import LossAccount
from agent.errors import UserError

log = logging.getLogger("egress-agent")
SOURCE = "conntrack"
MAX_KNOWN = 1 << 20  # flows the source remembers, so a resynchronising dump skips flows it has seen
BATCH = 4096  # events per queue item: one hand-off per netlink read, at most this many


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



class ConntrackSource:
    name = SOURCE

    def __init__(self, daemon):
        self.d = daemon
        self.loss: LossAccount | None = None
        self.kernel_counter = None
        self._socket_drops = 0
        self._counter_ok = True  # the last reading of the kernel's counter worked
        self._base_ns = 0  # when the kernel counter's baseline was read (CLOCK_REALTIME ns, as conntrack's)

    def open(self):
        self.d.metrics.source(SOURCE)
        src = self.d.cfg.source
        if src.get("enable"):
            from agent.sources.conntrack.table import enable_tracking

            for done in enable_tracking(src.get("netns"), self.d.pipeline.scoper, self.d.pipeline.inbound):
                log.info("enabled %s", done)
        return self

    def _open(self, m, acct: LossAccount):
        """Open the conntrack sockets (with the kernel-side filter) and take the counter's baseline."""
        from agent.sources.conntrack.filter import program
        from agent.sources.conntrack.table import Conntrack, read_sysctl

        src = self.d.cfg.source
        netns = src.get("netns")
        inbound = self.d.pipeline.inbound
        prog = program(self.d.pipeline.scoper, inbound) if src.get("kernel_filter", True) else None
        self.kernel_counter.inbound = inbound
        ct = Conntrack(netns, prog)
        if src.get("rcvbuf"):
            import socket as _s
            ct.ev.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, int(src["rcvbuf"]))
        # the baseline: read after the event socket exists, so every flow counted from here on
        # produces an event we can receive
        if acct.kernel_base is None:
            acct.kernel_reading(self.kernel_counter.read())
            # flows the kernel counts from here on: one the first dump lists that started after
            # this moment was counted too, and its NEW event is skipped as seen (see `run`)
            self._base_ns = time.time_ns()
        else:
            ct.dumps = 1  # a reopened socket: what its dump finds was missed, count it as recovered
        m.loss_accounting.labels(SOURCE).set(0 if acct.kernel_base is None else 1)
        if inbound and acct.kernel_base is not None and not self.kernel_counter.inbound_counted:
            log.warning("inbound connections are judged but left out of loss accounting: the kernel's counter "
                        "(table inet egress_agent) does not count them; source.enable: true installs one that does")
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
        elif self.d.seen_new:
            m.sampling.labels(SOURCE).set(self.d.kept_new / self.d.seen_new)
        m.queued.labels(SOURCE).set(self.d.pending_flows)

    def _plain(self, evs: list, known: dict, seen: dict, acct, drops) -> list:
        """`run`'s loop for a drain of the C reader when nothing is sampled or rate limited: the same
        batches, counts and `known` set, with the counts added once (also when a hand-off fails).
        Returns the last, partial batch."""
        batch: list = []
        append = batch.append
        n_new = n_destroy = arrived = kept = 0
        try:
            for kind, e, acc in evs:
                key = e[:6]
                if kind == "new":  # classified egress: `acc` says whether it is accountable
                    n_new += 1
                    if key in known:
                        continue
                    known[key] = None
                    if len(known) > MAX_KNOWN:
                        del known[next(iter(known))]
                    arrived += acc
                    kept += 1
                    append((kind, e, acc))
                else:
                    n_destroy += 1
                    if key in known:
                        del known[key]
                        append((kind, e, False))
                if len(batch) >= BATCH:
                    self.d._enqueue(batch, drops)
                    batch = []
                    append = batch.append
        finally:
            seen["new"] += n_new
            seen["destroy"] += n_destroy
            acct.arrived += arrived
            self.d.seen_new += kept
            self.d.kept_new += kept
        return batch

    def run(self, stop):
        from agent.sources.conntrack.kernel_count import KernelCounter

        src = self.d.cfg.source
        netns = src.get("netns")
        one_in = max(1, int(self.d.cfg.sampling.get("one_in", 1)))
        limiter = RateLimit(float(self.d.cfg.sampling.get("per_destination_per_second", 0)))
        every = float(src.get("accounting_interval", 1.0))
        m = self.d.metrics
        events = {k: m.source_events.labels(SOURCE, k) for k in m.EVENTS}
        drops = {k: m.drops.labels(SOURCE, k) for k in m.DROP_REASONS}
        tracking_gauge = m.tracking.labels(SOURCE)  # set on every pass: the label lookup made once
        self.kernel_counter = KernelCounter(netns)
        acct = self.loss = LossAccount()
        # Flows are identified by (conntrack id, proto, src, sport, dst, dport), `CtEntry[:6]`: the
        # 32-bit id alone collides (two live flows share one in ~1 of 10^4 pairs at 10^5 flows,
        # measured: bench_live lost one flow that way before this key).
        known: dict[tuple, None] = {}  # egress flows seen and still open; a resync skips them
        table = table_of = None
        ct = None
        next_tick = 0.0
        while not self.d.stop.is_set():
            try:
                if self.d.rescope.is_set() and ct is not None:
                    self.d.rescope.clear()
                    if src.get("enable"):
                        from agent.sources.conntrack.table import enable_tracking

                        enable_tracking(netns, self.d.pipeline.scoper, self.d.pipeline.inbound)
                    log.info("public/local networks changed: the kernel's event filter and egress counter were "
                             "rebuilt from the new scope table")
                    ct.close()
                    ct = None
                    acct.kernel_base = None  # a new counter (or new sets): a new baseline, totals kept
                if ct is None:
                    ct = self._open(m, acct)
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
                scoper = self.d.pipeline.scoper
                classify = scoper.classify
                inbound = self.d.pipeline.inbound
                # inbound connections count in the books only when the kernel's counter counts them
                in_acct = inbound and self.kernel_counter.inbound_counted
                mode = (scoper, 0 if not inbound else 2 if in_acct else 1)
                if mode != table_of:  # the C reader's copy of the scope table follows reloads
                    from agent.sources.conntrack.table import scope_table

                    table, table_of = scope_table(scoper, mode[1]), mode
                batch = []
                seen = dict.fromkeys(events, 0)  # events by kind, added to the counters once per drain
                try:
                    evs = ct.events(min(0.5, every), table)
                    if type(evs) is list and table is not None and one_in == 1 and limiter.rate <= 0:
                        # The C reader's drain (only "new", already classified, and "destroy") with
                        # nothing sampled away: the loop below, reduced to what such events need.
                        batch = self._plain(evs, known, seen, acct, drops)
                        evs = ()
                    for kind, e, acc in evs:
                        if len(batch) >= BATCH:
                            self.d._enqueue(batch, drops)
                            batch = []
                        seen[kind] += 1
                        key = e[:6]
                        if kind == "destroy":
                            if key in known:
                                del known[key]
                                batch.append((kind, e, False))
                            continue
                        if kind == "dump":
                            dumped += 1
                        if key in known:
                            continue
                        if acc is None:  # not classified by the C reader (which leaves out non-egress)
                            d_scope, d_acct = classify(e.dst)  # is_egress and accountable, one parse each
                            if d_scope != "public" and not inbound:
                                continue
                            s_scope, s_acct = classify(e.src)
                            if d_scope == "public":
                                if s_scope == "public":
                                    continue
                                acc = s_acct and d_acct
                            elif inbound and s_scope == "public":  # a public peer opened it: inbound
                                acc = s_acct and d_acct and in_acct
                            else:
                                continue
                        known[key] = None
                        if len(known) > MAX_KNOWN:
                            del known[next(iter(known))]
                        # a dumped flow is counted when it started after the baseline: the kernel
                        # counted it, and its NEW event (if it comes) is skipped as already seen
                        counted = acc and (kind != "dump" or 0 < self._base_ns <= e.start_ns)
                        if counted:
                            if kind in ("new", "dump"):
                                acct.arrived += 1
                            else:
                                acct.recovered += 1
                                m.recovered.labels(SOURCE).inc()
                        self.d.seen_new += 1
                        if one_in > 1 and (e.ct_id * 2654435761) % 4294967296 % one_in:
                            drops["sampled"].inc(counted)
                            continue
                        if limiter.rate > 0 and not limiter.allow(e.dst, time.monotonic()):
                            drops["rate_limited"].inc(counted)
                            continue
                        self.d.kept_new += 1
                        batch.append((kind, e, counted))
                    if batch:
                        self.d._enqueue(batch, drops)
                finally:  # counted even when a read fails mid-drain
                    seen["new"] += ct.skipped_new
                    ct.skipped_new = 0
                    for kind, n in seen.items():
                        if n:
                            events[kind].inc(n)
                if ct.needs_dump and ct.overflows:
                    acct.resync_pending = True  # an ENOBUFS: the dump runs at the next events() call
                elif not ct.needs_dump:
                    acct.resync_pending = False
                if tick:
                    self._account(m, acct, ct, kernel_now)
                tracking = dumped > 0 or self.d.seen_new > 0
                tracking_gauge.set(1 if tracking else 0)
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
                self.d.stop.wait(5)
            except Exception as e:  # OSError, or a bug: never let the source thread die
                m.source_up.labels(SOURCE).set(0)
                m.source_errors.labels(SOURCE, "io").inc()
                (log.error if isinstance(e, OSError) else log.exception)("conntrack source failed (%s); reopening", e)
                if ct is not None:
                    ct.close()
                ct = None
                self.d.stop.wait(1)
        if ct is not None:
            ct.close()
        m.source_up.labels(SOURCE).set(0)


def _tracking_rule_present(netns: str | None) -> bool:
    """True when some nftables rule refers to conntrack state (so the kernel tracks connections)."""
    import subprocess

    pre = ["ip", "netns", "exec", netns] if netns else []
    try:
        r = subprocess.run(pre + ["nft", "list", "ruleset"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and " ct state " in r.stdout


