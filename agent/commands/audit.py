"""`egress-agent audit`: the dry run. Inputs -> flows -> the shared pipeline -> one report.

Inputs are detected by content: pcap, pcapng (magic numbers) or JSON lines (a leading `{`).
A folder means every regular file in it, sorted. `--conntrack` audits one snapshot of the live
connection-tracking table through the same path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent.bulk import judge_table, judged_rows
from agent.commands.common import batch_run, build_pipeline
from agent.errors import UserError
from agent.flowtable import FlowTable
from agent.sinks.report import AuditReport
from agent.sources.pcap import read_capture, sniff_format

PROGRESS_MIN_BYTES = 32 << 20
# Judge in bulk (agent.bulk) unless the report lists every flow (`--flows` rows are built per flow).
# Tests turn it off to compare the two paths; `inventory` follows it too.
BULK = True


def expand_inputs(inputs) -> list[str]:
    out = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise UserError(f"{i}: folder has no files to audit")
            out.extend(files)
        elif p.exists():
            out.append(i)
        else:
            raise UserError(f"{i}: no such file")
    return out


def _progress(path: str):
    """A rich progress bar on a terminal for big files; None otherwise."""
    size = os.path.getsize(path)
    if size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(os.path.basename(path), total=size)
    bar.start()
    return bar, lambda done: bar.update(task, completed=done)


def read_input(path: str):
    """(flows, stats dict, packets or None) for one input file; a capture's flows come as a FlowTable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None
    if not head:
        raise UserError(f"{path}: empty file, not a capture or flow log")
    fmt = sniff_format(head)
    if fmt == "jsonl":
        from agent.sources.jsonl import read_jsonl
        from agent.sources.jsonl_table import read_jsonl_table

        got = read_jsonl_table(path)  # the plain log in bulk; None: read it line by line
        flows, stats = got if got is not None else read_jsonl(path)
        return flows, stats.to_json(), None
    if fmt is None:
        raise UserError(f"{path}: unknown file format (first bytes {head[:8].hex()}); "
                        "expected pcap, pcapng or JSON lines")
    bar, cb = _progress(path)
    try:
        cap = read_capture(path, progress=cb)
    finally:
        if bar:
            bar.stop()
    return cap.table, cap.stats.to_json(), cap.stats.packets


def run_audit(args) -> int:
    with batch_run():
        return _run_audit(args)


def _run_audit(args) -> int:
    if not args.inputs and not args.conntrack:
        raise UserError("audit: name at least one INPUT (capture, flow log or folder), or --conntrack")
    if args.netns and not args.conntrack:
        raise UserError("audit: --netns goes with --conntrack")
    pipe = build_pipeline(args)
    report = AuditReport(pipe.policies, pipe.locator.provenance(), with_flows=getattr(args, "flows", False))
    inv = None
    if getattr(args, "html", None):
        from agent.commands.inventory import Inventory

        inv = Inventory(pipe.register)
    sources = []
    if args.conntrack:
        from agent.sources.conntrack import snapshot

        flows, stats = snapshot(netns=args.netns)
        sources.append((flows, stats, None))
    for path in expand_inputs(args.inputs):
        sources.append(read_input(path))
    bulk = BULK and report.flows is None
    for flows, stats, packets in sources:
        report.add_input(stats, packets)
        if bulk:
            table = flows if isinstance(flows, FlowTable) else FlowTable.from_flows(flows)
            res = judge_table(pipe, table)
            report.add_table(table, res, count_packets=packets is None)
            if inv is not None:
                for _i, j in judged_rows(table, res):
                    inv.add(j)
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
    report.warnings.extend(pipe.locator.warnings)
    report.warnings.extend(getattr(pipe, "register_warnings", []))
    for w in report.warnings + report._redated_warning():
        print(f"egress-agent: warning: {w}", file=sys.stderr)
    from agent.cli import dumps, write_output

    if args.format == "json":
        pretty = not args.output and sys.stdout.isatty()
        write_output(dumps(report.to_json(), pretty=True) if pretty else report.to_json_bytes(), args.output)
    else:
        import io

        from rich.console import Console

        if args.output:
            buf = io.StringIO()
            report.render(Console(file=buf, width=160, force_terminal=False))
            write_output(buf.getvalue(), args.output)
        else:
            report.render(Console())
    if inv is not None:  # after the main report: a bad --html path must not cost the report itself
        write_report_html(args.html, "egress-agent audit", report, inv)
    return 1 if report.verdicts["violation"] else 0


def write_report_html(path: str, title: str, report, inv):
    """The self-contained HTML report (`--html`) from an audit report and an inventory of the same flows."""
    from agent.sinks.html import write_html

    full = report.to_json()
    write_html(path, title, {"by_country": full["destinations_by_country"], "inventory": inv.to_json(),
                             "violations": full["violations"], "inputs": full["inputs"],
                             "generated_at": full["generated_at"]})
