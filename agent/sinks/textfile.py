"""The result of one `audit` run as a node_exporter textfile (`audit --textfile PATH`).

Why: the nightly audit unit runs unattended; a JSON report nobody opens is no alert. node_exporter's
textfile collector (`--collector.textfile.directory`) exports `*.prom` files in a directory, so
Prometheus sees each run and the rules in deploy/prometheus/rules alert on it (violations found,
a failed run, no run for a day). Series, all gauges about the last run:

    egress_agent_audit_last_run_timestamp_seconds       when the run ended
    egress_agent_audit_success                          1 the audit completed (violations or not), 0 it failed
    egress_agent_audit_exit_code                        0 no violation, 1 violations, 2 bad input / --strict
    egress_agent_audit_duration_seconds
    egress_agent_audit_inputs                           files (or conntrack snapshots) read
    egress_agent_audit_input_warnings                   warnings the run printed (torn lines, gaps, ...)
    egress_agent_audit_connections{direction}           connections judged, outbound / inbound
    egress_agent_audit_connections_read                 every connection read, judged or not
    egress_agent_audit_violations{policy,severity}      violations per policy (every policy in force, 0 too)
    egress_agent_audit_indeterminate{policy}            verdicts that could not be decided

A failed run (exit 2) writes success 0 and its exit code, and no per-policy series: the previous
run's counts are not repeated as if they were this run's. Labels are bounded (policy names,
severities, two directions). The file is replaced atomically (a temporary file in the same folder,
then rename: node_exporter never reads half a file) and made readable by others (mode 0644: the
collector runs as another user; the counts name policies, not destinations).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from agent.errors import UserError

NS = "egress_agent_audit"


def write(path: str, *, started: float, ended: float, exit_code: int, report=None, policies: tuple = (),
          inputs: int = 0):
    """Write the textfile. `report`: the run's AuditReport (None for a failed run); `policies`: the
    policies in force, so each has a series even at 0."""
    r = CollectorRegistry()

    def g(name: str, doc: str, labels=()):
        return Gauge(f"{NS}_{name}", doc, labels, registry=r)

    g("last_run_timestamp_seconds", "When the last egress-agent audit run ended.").set(ended)
    g("success", "1 when the last audit run completed (with or without violations), 0 when it failed.").set(
        1 if exit_code in (0, 1) else 0)
    g("exit_code", "Exit code of the last audit run: 0 no violation, 1 violations, 2 bad input or --strict.").set(
        exit_code)
    g("duration_seconds", "How long the last audit run took.").set(max(0.0, ended - started))
    g("inputs", "Inputs (files, conntrack snapshots) the last audit run read.").set(inputs)
    if report is not None:
        g("input_warnings", "Warnings the last audit run printed.").set(len(report.warnings))
        tot = report.totals
        g("connections_read", "Connections the last audit run read, judged or not.").set(tot["flows"])
        conns = g("connections", "Connections the last audit run judged, by direction.", ["direction"])
        conns.labels("outbound").set(tot["egress_flows"])
        conns.labels("inbound").set(tot["inbound_flows"])
        viol = g("violations", "Violations the last audit run found, by policy and severity.", ["policy", "severity"])
        indet = g("indeterminate", "Verdicts the last audit run could not decide, by policy.", ["policy"])
        counts = {(p.name, p.severity): 0 for p in policies}
        counts.update(report.record_counts("violation"))
        undecided = {p.name: 0 for p in policies}
        for (name, _sev), n in report.record_counts("indeterminate").items():
            undecided[name] = undecided.get(name, 0) + n
        for (name, sev), n in counts.items():
            viol.labels(name, sev).set(n)
        for name, n in undecided.items():
            indet.labels(name).set(n)
    try:
        write_to_textfile(path, r)
        os.chmod(path, 0o644)
    except OSError as e:
        raise UserError(f"audit --textfile: cannot write {path}: {e.strerror or e}") from None
