"""`egress-agent audit`: the dry run. Inputs -> flows -> the shared pipeline -> one report.

Inputs are detected by content: pcap, pcapng (magic numbers) or JSON lines (a leading `{`).
A folder means every regular file in it, sorted. `--conntrack` audits one snapshot of the live
connection-tracking table through the same path.
"""

from __future__ import annotations

import sys

from agent.commands import inputs
from agent.commands.common import batch_run, build_pipeline, write_report_html
from agent.commands.inputs import expand_inputs, read_input
from agent.connections import connections
from agent.errors import UserError
from agent.flowtable import FlowTable
from agent.judge.bulk import judge_table
from agent.sinks.report import AuditReport


def run_audit(args) -> int:
    """The audit; with `--textfile`, its result is also written for node_exporter, a failed run too."""
    import time

    started = time.time()
    run = {"report": None, "policies": (), "inputs": 0}
    code = 2
    try:
        with batch_run():
            code = _run_audit(args, run)
    except BaseException:
        if getattr(args, "textfile", None):  # the failure is recorded; its own error stays the one shown
            try:
                _textfile(args, started, 2, run)
            except UserError as e:
                print(f"egress-agent: warning: {e}", file=sys.stderr)
        raise
    if getattr(args, "textfile", None):
        _textfile(args, started, code, run)
    return code


def _textfile(args, started: float, code: int, run: dict):
    import time

    from agent.sinks import textfile

    textfile.write(args.textfile, started=started, ended=time.time(), exit_code=code,
                   report=run["report"] if code in (0, 1) else None, policies=run["policies"], inputs=run["inputs"])


def _run_audit(args, run: dict | None = None) -> int:
    run = run if run is not None else {}
    if not args.inputs and not args.conntrack:
        raise UserError("audit: name at least one INPUT (capture, flow log or folder), or --conntrack")
    if args.netns and not args.conntrack:
        raise UserError("audit: --netns goes with --conntrack")
    pipe = build_pipeline(args)
    report = AuditReport(pipe.policies, pipe.locator.provenance(), with_flows=getattr(args, "flows", False))
    run.update(report=report, policies=tuple(pipe.policies))
    inv = None
    if getattr(args, "html", None):
        from agent.commands.inventory import Inventory

        inv = Inventory(pipe.register)
    sources = []
    if args.conntrack:
        from agent.sources.conntrack.table import snapshot

        flows, stats = snapshot(netns=args.netns)
        sources.append((connections(FlowTable.from_flows(flows)), stats, None))
    ports = getattr(args, "export_ports", None) or ()
    for path in expand_inputs(args.inputs):
        sources.append(read_input(path, ports))
    bulk = inputs.BULK
    for flows, stats, packets in sources:
        report.add_input(stats, packets)
        run["inputs"] = run.get("inputs", 0) + 1
        if bulk:
            table = flows if isinstance(flows, FlowTable) else FlowTable.from_flows(flows)
            res = judge_table(pipe, table)
            report.add_table(table, res, count_packets=packets is None)
            if inv is not None:
                inv.add_table(table, res)
            continue
        if isinstance(flows, FlowTable):
            flows = flows.flows()
        for flow in flows:
            direction = pipe.judged_direction(flow)
            j = pipe.judge(flow, inbound=direction == "inbound") if direction is not None else None
            report.add_flow(flow, count_packets=packets is None, judged=j)
            if j is not None:
                report.add(j)
                if inv is not None and not j.inbound:
                    inv.add(j)
    unseen = nothing_judged(pipe, report, [s[0] for s in sources])
    if unseen:
        report.warnings.append(unseen)
    report.warnings.extend(pipe.locator.warnings)
    report.warnings.extend(getattr(pipe, "register_warnings", []))
    for w in report.warnings + report._redated_warning():
        print(f"egress-agent: warning: {w}", file=sys.stderr)
    from agent.output import dumps, render_text, write_output

    if args.format == "json":
        pretty = not args.output and sys.stdout.isatty()
        write_output(dumps(report.to_json(), pretty=True) if pretty else report.json_chunks(), args.output)
    else:
        render_text(report.render, args.output)
    if inv is not None:  # after the main report: a bad --html path must not cost the report itself
        write_report_html(args.html, "egress-agent audit", report, inv)
    if unseen and getattr(args, "strict", False):
        raise UserError(f"audit --strict: {unseen}")
    return 1 if report.verdicts["violation"] else 0


def nothing_judged(pipe, report, tables) -> str | None:
    """Why an audit that read connections judged none, naming the busiest openers that look like
    this host (public addresses that opened connections) and the --local-net that would judge them;
    None when something was judged or nothing was read. A pass that judged nothing is not a pass."""
    tot = report.totals
    if not tot["flows"] or tot["egress_flows"] or tot["inbound_flows"]:
        return None
    from collections import Counter

    openers: Counter = Counter()
    for t in tables:
        src = t.src
        public = [pipe.scoper.classify(a)[0] == "public" for a in src.text]
        for i in src.inverse.tolist():
            if public[i]:
                openers[src.text[i]] += 1
    if not openers:
        return (f"{tot['flows']:,} connection(s) read, none judged: none was opened by a local host to a public "
                "address (every endpoint is local or reserved; --public-net makes a range public)")
    top = openers.most_common(3)
    busiest = ", ".join(f"{a} ({n:,} connection(s))" for a, n in top)
    import ipaddress

    a = top[0][0]
    net = ipaddress.ip_network(f"{a}/64" if ":" in a else f"{a}/32", strict=False)  # a host's usual IPv6 /64
    return (f"{tot['flows']:,} connection(s) read, none judged: no local host was recognised (every opener is a "
            f"public address). The busiest openers, which may be this host: {busiest}. If {a} is this host, pass "
            f"--local-net {net}")
