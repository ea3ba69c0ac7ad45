"""Prometheus metrics for verdicts and for the agent's own health, on a private registry.

    metrics:
      listen: 127.0.0.1:9807   # loopback only by default; put a proxy or firewall in front otherwise

Labels are bounded sets only: policy, verdict, severity, reason, country (ISO code or "unknown"),
jurisdiction, source, event and drop kinds, direction (outbound or inbound: who opened the
connection). Never an address, port, hostname or pid: those go to
the evidence log. Port 9807 is this project's default; any free port works.
"""

from __future__ import annotations

from datetime import UTC

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from agent import __version__
from agent.flow import Outcome

NS = "egress_agent"
_VALUE = {o: o.value for o in Outcome}


def country_label(loc) -> str:
    return loc.country if (loc.unknown_reason is None and loc.country) else "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self._children: dict = {}
        self._by_plan: dict = {}  # (ids of a judgement's tuples, country) -> [plan, flows, bytes] since the last flush
        self._plans: dict = {}  # see judged()
        self.flows = Counter(f"{NS}_flows", "Connections judged, by policy, verdict, the peer's country and "
                             "direction (outbound: a local host opened it; inbound: a public peer did).",
                             ["policy", "verdict", "country", "direction"], registry=r)
        self.bytes = Counter(f"{NS}_bytes", "IP-layer bytes the opener sent on judged connections (original "
                             "direction), by policy, verdict, the peer's country and direction.",
                             ["policy", "verdict", "country", "direction"], registry=r)
        self.violations = Counter(f"{NS}_violations", "Connections judged a violation, by policy, severity, the "
                                  "peer's country and direction.", ["policy", "severity", "country", "direction"],
                                  registry=r)
        self.indeterminate = Counter(f"{NS}_indeterminate", "Connections whose verdict could not be decided, by "
                                     "reason and direction.", ["policy", "reason", "direction"], registry=r)
        self.jurisdiction_bytes = Counter(f"{NS}_jurisdiction_bytes",
                                          "Egress bytes by destination jurisdiction group.", ["jurisdiction"],
                                          registry=r)
        self.source_up = Gauge(f"{NS}_source_up", "1 when the flow source is running.", ["source"], registry=r)
        self.dry_run: frozenset = frozenset()  # policies whose violations count as would-refuse (enforcement)
        self.would_refuse = Counter(f"{NS}_enforcement_would_refuse", "Outbound connections a policy in dry-run "
                                    "enforcement would have refused (its violations; no traffic is touched), by "
                                    "policy and the peer's country.", ["policy", "country"], registry=r)
        self.enforcement_mode = Gauge(f"{NS}_enforcement_mode", "1 for each policy's effective enforcement mode "
                                      "(its `enforce`, capped by the agent's `enforce` switch).", ["policy", "mode"],
                                      registry=r)
        self.refused = Counter(f"{NS}_enforcement_refused", "New outbound connections the kernel refused for a "
                               "policy in refuse mode (the agent's nftables counter per policy).", ["policy"],
                               registry=r)
        self.enforcement_elements = Gauge(f"{NS}_enforcement_set_elements", "Intervals in a refuse policy's "
                                          "destination set, by address family.", ["policy", "family"], registry=r)
        self.enforcement_build = Gauge(f"{NS}_enforcement_build_seconds", "Time the last successful build of the "
                                       "refuse sets took (compilation and the nftables transaction).", registry=r)
        self.enforcement_built = Gauge(f"{NS}_enforcement_last_build_timestamp_seconds", "When the refuse sets in "
                                       "force were built.", registry=r)
        self.enforcement_ok = Gauge(f"{NS}_enforcement_build_success", "1 when the last build of the refuse sets "
                                    "succeeded; 0 while the previous sets stay in force after a failed one.",
                                    registry=r)
        self.enforcement_unrecorded = Counter(f"{NS}_enforcement_unrecorded", "Refused connections without an "
                                              "evidence record of their own: counted while the bounded set of "
                                              "refused connections was full, or lost to a full worker queue.",
                                              ["policy"], registry=r)
        self.enforcement_names = Counter(f"{NS}_enforcement_name_allowed", "Addresses put in a refuse policy's "
                                         "allow-by-name set from a DNS answer the capture believed.", registry=r)
        self.enforcement_names_dropped = Counter(f"{NS}_enforcement_name_answers_dropped", "DNS answers not looked at "
                                                 "for allow-by-name sets (more than 4,096 waiting).", registry=r)
        self.source_errors = Counter(f"{NS}_source_errors", "Errors reading the flow source.", ["source", "kind"],
                                     registry=r)
        self.source_events = Counter(f"{NS}_source_events", "Events read from the flow source.", ["source", "event"],
                                     registry=r)
        self.drops = Counter(f"{NS}_source_drops", "Flows or events not judged, by reason.", ["source", "reason"],
                             registry=r)
        self.sampling = Gauge(f"{NS}_sampling_ratio",
                              "Fraction of new flows judged (multiply counts by 1/ratio to estimate totals).",
                              ["source"], registry=r)
        self.tracking = Gauge(f"{NS}_conntrack_tracking",
                              "1 when the kernel tracks connections in the watched namespace.",
                              ["source"], registry=r)
        self.accounting = Gauge(f"{NS}_conntrack_accounting", "1 when conntrack byte/packet accounting is on.",
                                ["source"], registry=r)
        self.geoip_build = Gauge(f"{NS}_geoip_database_build_timestamp_seconds",
                                 "Build time of each GeoIP database in use.", ["database"], registry=r)
        self.policies_loaded = Gauge(f"{NS}_policies_loaded", "Policies in force.", registry=r)
        self.reload_success = Gauge(f"{NS}_config_last_reload_successful", "1 if the last (re)load worked.",
                                    registry=r)
        self.reload_time = Gauge(f"{NS}_config_last_reload_success_timestamp_seconds",
                                 "When policies and config last loaded successfully.", registry=r)
        self.exception_expiry = Gauge(f"{NS}_exception_expiry_timestamp_seconds",
                                      "When each policy exception stops exempting flows.", ["policy", "exception"],
                                      registry=r)
        self.geoip_ok = Gauge(f"{NS}_geoip_last_reload_successful",
                              "0 while a changed GeoIP database file cannot be opened (the previous one stays "
                              "in use and the agent retries); 1 otherwise.", registry=r)
        self.geoip_ok.set(1)
        self.attribution = Gauge(f"{NS}_attribution_enabled",
                                 "1 when flows are attributed to processes; 0 when only uid/user can be given "
                                 "(reason: no-permission, disabled).", ["mode"], registry=r)
        self.kernel_flows = Counter(f"{NS}_kernel_flows", "New egress connections the kernel counted (the agent's "
                                    "nftables counter), since the agent started.", ["source"], registry=r)
        self.judged_flows = Counter(f"{NS}_flows_judged", "Flows judged, per source (each flow once, whatever the "
                                    "number of policies).", ["source"], registry=r)
        self.unaccounted = Gauge(f"{NS}_flows_unaccounted",
                                 "Kernel flows minus judged, dropped (by reason) and queued flows: flows that went "
                                 "missing without the kernel reporting a loss. Should be 0.", ["source"], registry=r)
        self.queued = Gauge(f"{NS}_flows_queued", "Flows read from the source and waiting to be judged.", ["source"],
                            registry=r)
        self.events_lost = Counter(f"{NS}_source_events_lost", "Events the kernel dropped because the agent's "
                                   "socket buffer was full (NEW and DESTROY; the socket's drop counter).", ["source"],
                                   registry=r)
        self.recovered = Counter(f"{NS}_source_flows_recovered", "Flows found by a resynchronising dump after "
                                 "lost events (judged; their NEW event never arrived).", ["source"], registry=r)
        self.loss_accounting = Gauge(f"{NS}_loss_accounting", "1 when the source's losses are measured: "
                                     "against the kernel's flow counter (conntrack), or by the exporters' "
                                     "sequence numbers (netflow, sflow).", ["source"], registry=r)
        self.state_evicted = Counter(f"{NS}_state_evicted", "Open flows forgotten because the open-flow table was "
                                     "full (judged when new; their final byte count is lost).", ["source"],
                                     registry=r)
        self.evidence_lines = Counter(f"{NS}_evidence_lines", "Evidence records written.", registry=r)
        self.evidence_errors = Counter(f"{NS}_evidence_errors", "Evidence records that could not be written "
                                       "(lost lines: disk full, I/O error).", registry=r)
        self.evidence_gaps = Counter(f"{NS}_evidence_gaps", "Gap records written to the evidence log (after lost "
                                     "lines, or at start after an unclean stop).", registry=r)
        self.jurisdiction_reviewed = Gauge(f"{NS}_jurisdiction_data_reviewed_timestamp_seconds",
                                           "When each jurisdiction group's entries were last checked against "
                                           "their sources (the file's `reviewed` date).", ["group"], registry=r)
        self.http_auth_refused = Counter(f"{NS}_http_auth_refused", "Metrics requests refused basic auth, by "
                                         "reason: failed (wrong user or password), backoff (the client failed "
                                         "recently), busy (too many password checks waiting).", ["reason"],
                                         registry=r)
        self.http_rejected = Counter(f"{NS}_http_connections_rejected", "Metrics connections closed at once "
                                     "because the connection limit was reached.", registry=r)
        self.capture_packets = Counter(f"{NS}_capture_packets", "Packets the capture source read (after its "
                                       "kernel filter: DNS answers, TLS and QUIC hello candidates).", registry=r)
        self.names = Counter(f"{NS}_flows_named", "Judged flows that carried a host name, by where the name came "
                             "from (sni, quic-sni, dns).", ["source"], registry=r)
        self.name_events = Counter(f"{NS}_name_events", "DNS answers and name-table entries the name extractor "
                                   "refused or dropped, by kind: dns_unsolicited (an answer to no query seen, "
                                   "from no trusted resolver), dns_ttl_capped, dns_queries_evicted, "
                                   "dns_answers_evicted, quic_streams_evicted.", ["kind"], registry=r)
        self.names_malformed = Counter(f"{NS}_name_packets_malformed", "Malformed DNS, TLS or QUIC packets the "
                                       "name extractor skipped, by kind.", ["kind"], registry=r)
        self.recipient_flows = Counter(f"{NS}_recipient_flows", "Judged flows by recipient of the register "
                                       "(its ids), or undeclared when none matched (only with a register loaded).",
                                       ["recipient"], registry=r)
        self.undeclared_recipients = Counter(f"{NS}_undeclared_recipients", "Undeclared recipients (host name's "
                                             "registrable domain, else network operator) seen for the first time; "
                                             "each is logged by name once and remembered across restarts "
                                             "(undeclared-recipients.json beside the evidence log).", registry=r)
        Info(f"{NS}_build", "Version of egress-agent.", registry=r).info({"version": __version__})

    # Reasons a flow the kernel saw was not judged; with judged and queued they add up to kernel flows.
    DROP_REASONS = ("sampled", "rate_limited", "queue_full", "overflow", "error")
    ERROR_KINDS = ("overflow", "io", "setup", "judge")
    EVENTS = ("dump", "resync", "new", "destroy")
    DIRECTIONS = ("outbound", "inbound")  # the `direction` label: who opened the connection

    def source(self, source: str):
        """Create the bounded label sets of a source at zero, so every series exists from the start."""
        for reason in self.DROP_REASONS:
            self.drops.labels(source, reason)
        for kind in self.ERROR_KINDS:
            self.source_errors.labels(source, kind)
        for event in self.EVENTS:
            self.source_events.labels(source, event)
        self.source_up.labels(source).set(0)
        self.sampling.labels(source).set(1.0)
        for m in (self.judged_flows, self.events_lost, self.recovered, self.state_evicted):
            m.labels(source)
        self.queued.labels(source).set(0)
        self.loss_accounting.labels(source).set(0)

    def collector(self, source: str, exporters: list[str], outcomes: tuple, kinds: tuple):
        """The flow collector's series (`agent.sources.netflow.source`), made at zero for every
        configured exporter (by site) and `other`: records by outcome, datagrams, records the
        exporters' sequence numbers say were lost, and what the decoder refused by kind."""
        r = self.registry
        if not hasattr(self, "exporter_records_c"):
            self.exporter_records_c = Counter(f"{NS}_exporter_records", "Flow records an exporter sent, by "
                                              "outcome: connection (a new connection: judged, queued or dropped "
                                              "as source_drops_total says), merged (part of a connection already "
                                              "counted: its reverse, or a later record), not_egress, refused "
                                              "(an unknown exporter, refused by unknown_exporters), error (in "
                                              "a read round that a fault ended; logged).",
                                              ["source", "exporter", "outcome"], registry=r)
            self.exporter_datagrams_c = Counter(f"{NS}_exporter_datagrams", "Export datagrams received, per "
                                                "exporter (configured site, or other).", ["source", "exporter"],
                                                registry=r)
            self.exporter_lost_c = Counter(f"{NS}_exporter_lost_records", "Flow records (sFlow: samples) the "
                                           "exporter's sequence numbers say were lost before they reached the "
                                           "agent.", ["source", "exporter"], registry=r)
            self.exporter_last_c = Gauge(f"{NS}_exporter_last_datagram_timestamp_seconds", "When the exporter "
                                         "last sent a datagram.", ["source", "exporter"], registry=r)
            self.collector_refused_c = Counter(f"{NS}_collector_refused", "What the collector's decoder could not "
                                               "use, by kind (malformed, unknown_version, no_template, "
                                               "templates_evicted, sampling_unknown, no_time, not_ip, no_header, "
                                               "counter_samples).", ["source", "kind"], registry=r)
        for e in exporters:
            for o in outcomes:
                self.exporter_records_c.labels(source, e, o)
            for m in (self.exporter_datagrams_c, self.exporter_lost_c):
                m.labels(source, e)
        for k in kinds:
            self.collector_refused_c.labels(source, k)
        self.drops.labels(source, "export_loss")

    def exporter_records(self, source: str, exporter: str, outcome: str, n: int = 1):
        self._child(self.exporter_records_c, source, exporter, outcome).inc(n)

    def exporter_datagrams(self, source: str, exporter: str, n: int = 1):
        self._child(self.exporter_datagrams_c, source, exporter).inc(n)

    def exporter_seen(self, source: str, exporter: str, when: float):
        self._child(self.exporter_last_c, source, exporter).set(when)

    def export_lost(self, source: str, exporter: str, n: int):
        self._child(self.exporter_lost_c, source, exporter).inc(n)
        self._child(self.drops, source, "export_loss").inc(n)

    def collector_refused(self, source: str, kind: str, n: int):
        self._child(self.collector_refused_c, source, kind).inc(n)

    def enforcement(self, policies, switch: str):
        """Each policy's effective mode (`enforce`, capped by the host's switch) as
        `egress_agent_enforcement_mode{policy,mode}`; dry-run policies' outbound violations count in
        `egress_agent_enforcement_would_refuse_total{policy,country}` from now on."""
        from agent.policy.model import ENFORCE_MODES, effective_mode

        modes = {p.name: effective_mode(p.enforce, switch) for p in policies}
        self.dry_run = frozenset(n for n, m in modes.items() if m == "dry-run")
        self._plans.clear()  # cached plans hold the previous set
        self.enforcement_mode.clear()
        for name, mode in modes.items():
            for m in ENFORCE_MODES:
                self.enforcement_mode.labels(name, m).set(1 if m == mode else 0)
        for name in self.dry_run:
            self.would_refuse.labels(name, "unknown")
        for name in (n for n, m in modes.items() if m == "refuse"):
            self.refused.labels(name)

    def _child(self, metric, *labels):
        """Label children cached by value: `labels()` costs microseconds per call on the hot path."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def judged(self, j, bytes_only: bool = False, nbytes: int | None = None):
        """Count one judged flow: flows + bytes per verdict, violations, indeterminate reasons.
        `bytes_only` with `nbytes`: only bytes the flow carried since it was last counted.

        Counts gather in a plain dict and reach the Prometheus counters in `flush()` (the worker
        calls it after every batch): one locked increment per label set per batch, instead of
        four to eight per flow.
        """
        self.judged_counts(j.outcomes, j.jurisdictions, country_label(j.location),
                           j.flow.bytes if nbytes is None else nbytes, bytes_only,
                           "inbound" if j.inbound else "outbound")

    def judged_counts(self, outcomes: tuple, jurisdictions: tuple, cc: str, n: int, bytes_only: bool = False,
                      direction: str = "outbound"):
        """`judged` from its parts: the judgement's outcomes and jurisdictions (the verdict cache's
        tuples), its country label, the bytes to count and its direction (DIRECTIONS)."""
        # the outcomes and jurisdictions tuples are the verdict cache's, shared by every flow of a
        # cache key: the label sets they count under are worked out once per (tuples, country)
        # Counted per plan (flows, bytes) until `flush` spreads them over the plan's label sets: two
        # additions per flow whatever the number of policies.
        pk = (id(outcomes), id(jurisdictions), cc, direction)
        got = self._by_plan.get(pk)
        if got is None:
            plan = self._plans.get(pk)
            if plan is None or plan[2] is not outcomes or plan[3] is not jurisdictions:
                if len(self._plans) >= 4096:
                    self._plans.clear()
                plan = self._plans[pk] = self._plan(outcomes, jurisdictions, cc, direction)
            got = self._by_plan[pk] = [plan, 0, 0]  # the plan keeps the tuples, so their ids stay theirs
        if not bytes_only:
            got[1] += 1
        got[2] += n

    def _plan(self, outcomes, jurisdictions, cc, direction) -> tuple:
        """(label sets counted once per flow, label sets that count its bytes, and the two tuples,
        kept so their ids stay theirs while the plan is cached)."""
        counts, nbytes = [], []
        for v in outcomes:
            outcome = _VALUE[v.outcome]
            if outcome == "not_applicable":
                continue
            counts.append((self.flows, v.policy, outcome, cc, direction))
            if outcome == "violation":
                counts.append((self.violations, v.policy, v.severity, cc, direction))
                if v.policy in self.dry_run and direction == "outbound":
                    counts.append((self.would_refuse, v.policy, cc))
            elif outcome == "indeterminate":
                counts.append((self.indeterminate, v.policy, v.reason, direction))
            nbytes.append((self.bytes, v.policy, outcome, cc, direction))
        nbytes += [(self.jurisdiction_bytes, g) for g in jurisdictions]
        return tuple(counts), tuple(nbytes), outcomes, jurisdictions

    def flush(self):
        """Apply the counts gathered by `judged` to the exported counters."""
        pend: dict = {}
        by_plan, self._by_plan = self._by_plan, {}
        for (counts, nbytes, *_), flows, n in by_plan.values():
            if flows:
                for k in counts:
                    pend[k] = pend.get(k, 0) + flows
            if n:
                for k in nbytes:
                    pend[k] = pend.get(k, 0) + n
        for (metric, *labels), n in pend.items():
            self._child(metric, *labels).inc(n)

    def jurisdictions(self, jur):
        from datetime import datetime, time

        self.jurisdiction_reviewed.clear()
        for g in jur.groups.values():
            if g.reviewed:
                self.jurisdiction_reviewed.labels(g.name).set(
                    datetime.combine(g.reviewed, time(0), tzinfo=UTC).timestamp())

    def policies(self, policies, geoip_provenance):
        self.policies_loaded.set(len(policies))
        self.exception_expiry.clear()
        from datetime import datetime, time

        for p in policies:
            for e in p.exceptions:
                ts = datetime.combine(e.expires, time(0), tzinfo=UTC).timestamp()
                self.exception_expiry.labels(p.name, e.id).set(ts)
        self.geoip_build.clear()
        for g in geoip_provenance:
            if g.get("build_epoch"):
                self.geoip_build.labels(g["database_type"]).set(g["build_epoch"])
