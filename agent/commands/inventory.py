"""`egress-agent inventory`: the observed transfer inventory, compared with the recipient register.

Reads what `audit` reads (captures, flow logs, the daemon's evidence log), judges every flow through
the same pipeline, and aggregates egress into exporter -> recipient -> destination countries:

- exporter: the systemd unit, container or command of the sending process when the source knows it
  (live evidence), else the source network (/24 for IPv4, /64 for IPv6);
- recipient: the register's recipient the flow matched, else what is known of who received it:
  the host name's registrable domain by the Public Suffix List (`host:payroll.example`,
  `host:bbc.co.uk`), else the
  network operator (`AS64500 Example Org`), else `unknown`.

Then the difference with the register, the three lists a data-protection officer needs:
`undeclared` (recipients nobody declared), `unseen` (declared, never seen in these inputs), and
`outside_declared_locations` (declared recipients seen in countries they did not declare).
Rows are outbound connections (a local host opened them; inbound ones are not transfers of this
inventory): `bytes`/`packets_sent` are what the local side sent, `bytes_received`/
`packets_received` what came back, `opened_by` how each connection's opener is known (counts).
Output: table (default), JSON, or CSV (one row per exporter, recipient and country, for a records
tool). Exit 0 when everything seen is declared and inside its declared locations, 1 otherwise,
2 for bad input.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import sys
from collections import Counter, defaultdict
from functools import lru_cache

from agent.commands import inputs
from agent.commands.common import batch_run, build_pipeline, write_report_html
from agent.commands.inputs import expand_inputs, read_input
from agent.errors import UserError
from agent.flow import OPENED_BY, iso_time
from agent.flowtable import FlowTable
from agent.judge.bulk import judge_table
from agent.policy.recipients import fallback_recipient


def exporter_of(flow) -> str:
    w = flow.who
    if w is not None:
        if w.unit:
            return f"unit:{w.unit}"
        if w.container:
            return f"container:{w.container[:12]}"
        name = (w.exe or "").rsplit("/", 1)[-1] or w.comm
        if name:
            return f"process:{name}"
    return _source_net(flow.src)


@lru_cache(maxsize=65536)
def _source_net(src: str) -> str:
    """The exporter of a flow without a process: its source's /24 or /64 (few per capture, so
    parsed once each; `ipaddress` costs ~30 us an address)."""
    a = ipaddress.ip_address(src)
    return f"net:{ipaddress.ip_network(f'{a}/{24 if a.version == 4 else 64}', strict=False)}"


class Inventory:
    def __init__(self, register):
        self.register = register
        self.rows: dict[tuple, dict] = {}

    def add(self, j):
        f = j.flow
        self._add(j, 1, f.bytes or 0, f.packets, f.bytes_reply, f.packets_reply, {f.opened_by or "unknown": 1},
                  f.first_seen or None, f.last_seen or None)

    def _add(self, j, flows: int, nbytes: int, packets: int, bytes_reply: int, packets_reply: int, opened: dict,
             first: float | None, last: float | None):
        """`flows` flows that share j's exporter, recipient, location and verdicts (j's flow is one of
        them), with their sums, openers and earliest and latest times."""
        f, loc = j.flow, j.location
        rec = j.recipient
        key_r = rec.id if rec is not None else fallback_recipient(f, loc)
        # without a location database only the country of registration is known: shown, marked, and
        # never compared with declared locations
        country = loc.country if loc.unknown_reason is None and loc.country else (
            f"registered:{loc.registered_country}" if loc.registered_country else "unknown")
        key = (exporter_of(f), key_r)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = {"exporter": key[0], "recipient": key_r, "declared": rec is not None,
                                    "recipient_name": rec.name if rec is not None else None,
                                    "countries": Counter(), "flows": 0, "bytes": 0, "bytes_received": 0,
                                    "packets_sent": 0, "packets_received": 0, "opened_by": Counter(),
                                    "first_seen": None,
                                    "last_seen": None, "verdicts": Counter(), "bases": set(), "hostnames": set()}
        row["countries"][country] += nbytes
        row["flows"] += flows
        row["bytes"] += nbytes  # what the local side (the opener: rows are egress) sent
        row["packets_sent"] += packets
        row["bytes_received"] += bytes_reply
        row["packets_received"] += packets_reply
        row["opened_by"].update(opened)
        # compared as numbers (texts leave out a zero fraction, so "…:40Z" sorts after "…:40.01Z")
        if first is not None and (row["first_seen"] is None or first < row["first_seen"]):
            row["first_seen"] = first
        if last is not None and (row["last_seen"] is None or last > row["last_seen"]):
            row["last_seen"] = last
        for v in j.outcomes:
            row["verdicts"][v.outcome.value] += flows
            if v.exception:
                row["bases"].add(v.exception)
        if f.hostname and len(row["hostnames"]) < 20:
            row["hostnames"].add(f.hostname)

    def add_table(self, t, res):
        """`add` of every outbound row of a table judged in bulk (`agent.judge.bulk`), with the same
        result. Rows of one group (location and verdicts) and one source share their exporter and
        recipient, so where rows carry no host name or process of their own they are added per such
        unit, their sums made with numpy, not a Flow and a Judged per row (a 1M-flow log with
        --html: 40 s and 1.9 GB before); the others, and rows judged one by one, are added alone."""
        import numpy as np

        from agent.judge.bulk import OUTBOUND, judged_row, judged_rows

        rows = np.flatnonzero(res.direction == OUTBOUND)
        first, last = t.first[rows], t.last[rows]
        if t.hostname is not None or t.who is not None or np.isnan(first).any() or np.isnan(last).any():
            for _i, j in judged_rows(t, res):
                self.add(j)
            return
        if not len(rows):
            return
        key = res.key[rows]
        # a unit per (group, source) of group rows, and one per row judged alone (key -1)
        unit = np.where(key >= 0, key * (len(t.src.text) + 1) + t.src.inverse[rows], -1 - rows)
        _u, head, inv = np.unique(unit, return_index=True, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        cuts = np.searchsorted(inv[order], np.arange(len(head)))

        def sums(col) -> list:
            return np.add.reduceat(col[rows][order], cuts).tolist() if col is not None else [0] * len(head)

        flows = np.bincount(inv, minlength=len(head)).tolist()
        nbytes, packets = sums(t.bytes), sums(t.packets)
        conn = t.opened is not None  # as FlowTable.flow: reply counters with the connection's opener
        bytes_reply, packets_reply = sums(t.bytes_reply if conn else None), sums(t.packets_reply if conn else None)
        firsts = np.minimum.reduceat(np.where(first != 0, first, np.inf)[order], cuts).tolist()
        lasts = np.maximum.reduceat(np.where(last != 0, last, -np.inf)[order], cuts).tolist()
        opened: list[dict] = [{} for _ in head] if conn else [{"unknown": n} for n in flows]
        if conn:
            codes = t.opened[rows].astype(np.int64)
            pair, counts = np.unique(inv * 256 + codes, return_counts=True)
            for p, n in zip(pair.tolist(), counts.tolist(), strict=True):
                opened[p >> 8][OPENED_BY[p & 255] or "unknown"] = n
        heads = head.tolist()
        for u in sorted(range(len(heads)), key=heads.__getitem__):  # in row order, as `add` of each row
            self._add(judged_row(t, res, int(rows[heads[u]])), flows[u], nbytes[u], packets[u], bytes_reply[u],
                      packets_reply[u], opened[u], None if firsts[u] == np.inf else firsts[u],
                      None if lasts[u] == -np.inf else lasts[u])

    def to_json(self) -> dict:
        rows = [{**r, "countries": dict(sorted(r["countries"].items())), "verdicts": dict(r["verdicts"]),
                 "first_seen": iso_time(r["first_seen"]), "last_seen": iso_time(r["last_seen"]),
                 "opened_by": dict(sorted(r["opened_by"].items())), "direction": "outbound",
                 "bases": sorted(r["bases"]), "hostnames": sorted(r["hostnames"])}
                for r in sorted(self.rows.values(), key=lambda r: (-r["bytes"], r["exporter"], r["recipient"]))]
        by_recipient: dict[str, dict] = defaultdict(lambda: {"flows": 0, "bytes": 0, "countries": set(),
                                                             "exporters": set(), "hostnames": set()})
        for r in rows:
            g = by_recipient[r["recipient"]]
            g["flows"] += r["flows"]
            g["bytes"] += r["bytes"]
            g["countries"] |= set(r["countries"])
            g["exporters"].add(r["exporter"])
            g["hostnames"] |= set(r["hostnames"])
        declared = self.register.by_id if self.register is not None else {}
        undeclared = [{"recipient": k, "flows": g["flows"], "bytes": g["bytes"], "countries": sorted(g["countries"]),
                       "exporters": sorted(g["exporters"]), "hostnames": sorted(g["hostnames"])}
                      for k, g in sorted(by_recipient.items(), key=lambda kv: -kv[1]["bytes"]) if k not in declared]
        unseen = [{"recipient": rid, "name": r.name, "processing_locations": list(r.processing_locations)}
                  for rid, r in declared.items() if rid not in by_recipient]
        outside = []
        for rid, r in declared.items():
            g = by_recipient.get(rid)
            if g is None:
                continue
            out = sorted(c for c in g["countries"] if len(c) == 2 and c not in r.processing_locations)
            if out:
                outside.append({"recipient": rid, "name": r.name, "declared": list(r.processing_locations),
                                "observed_outside": out, "flows": g["flows"], "bytes": g["bytes"]})
        return {"inventory": rows, "undeclared": undeclared, "unseen": unseen, "outside_declared_locations": outside,
                "register": None if self.register is None else sorted(declared)}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["exporter", "recipient", "recipient_name", "declared", "country", "bytes", "flows", "first_seen",
                    "last_seen", "bases", "verdicts", "hostnames", "direction", "bytes_received", "opened_by"])
        for r in self.to_json()["inventory"]:
            for country, by in r["countries"].items():
                w.writerow([r["exporter"], r["recipient"], r["recipient_name"] or "", "yes" if r["declared"] else "no",
                            country, by, r["flows"], r["first_seen"] or "", r["last_seen"] or "",
                            " ".join(r["bases"]), " ".join(f"{k}={v}" for k, v in sorted(r["verdicts"].items())),
                            " ".join(r["hostnames"]), r["direction"], r["bytes_received"],
                            " ".join(f"{k}={v}" for k, v in r["opened_by"].items())])
        return buf.getvalue()

    def render(self, console):
        from rich.table import Table

        data = self.to_json()
        t = Table(title="Observed transfers: exporter -> recipient -> countries", title_justify="left")
        for col in ("exporter", "recipient", "declared", "countries (bytes)", "flows", "bytes", "basis"):
            t.add_column(col, justify="right" if col in ("flows", "bytes") else "left")
        for r in data["inventory"][:200]:
            name = f"{r['recipient']} ({r['recipient_name']})" if r["recipient_name"] else r["recipient"]
            t.add_row(r["exporter"], name, "yes" if r["declared"] else "[yellow]no[/]",
                      ", ".join(f"{c} {b}" for c, b in r["countries"].items()), str(r["flows"]), str(r["bytes"]),
                      ", ".join(r["bases"]) or "-")
        console.print(t)
        if data["register"] is None:
            console.print("[yellow]No recipient register loaded (--recipients): every recipient is undeclared.[/]")
        for key, title in (("undeclared", "Seen but undeclared"), ("unseen", "Declared but never seen"),
                           ("outside_declared_locations", "Seen outside the declared locations")):
            items = data[key]
            console.print(f"[bold]{title}: {len(items)}[/]")
            for i in items[:100]:
                if key == "undeclared":
                    console.print(f"  {i['recipient']}: {i['flows']} flow(s), {i['bytes']} bytes to "
                                  f"{', '.join(i['countries'])} from {', '.join(i['exporters'][:3])}", highlight=False)
                elif key == "unseen":
                    console.print(f"  {i['recipient']} ({i['name']})", highlight=False)
                else:
                    console.print(f"  {i['recipient']} ({i['name']}): declared {', '.join(i['declared'])}, seen in "
                                  f"{', '.join(i['observed_outside'])}", highlight=False)


def run_inventory(args) -> int:
    with batch_run():
        return _run_inventory(args)


def _run_inventory(args) -> int:
    if not args.inputs:
        raise UserError("inventory: name at least one INPUT (capture, flow log, evidence log or folder)")
    pipe = build_pipeline(args)
    inv = Inventory(pipe.register)
    report = None
    if getattr(args, "html", None):
        from agent.sinks.report import AuditReport

        report = AuditReport(pipe.policies, pipe.locator.provenance())
    for path in expand_inputs(args.inputs):
        flows, stats, packets = read_input(path)
        if report is not None:  # the HTML report's summary counts what was read, as audit's does
            report.add_input(stats, packets)
        if inputs.BULK:  # judged in bulk, then one Judged per egress flow (agent.judge.bulk.judged_rows)
            table = flows if isinstance(flows, FlowTable) else FlowTable.from_flows(flows)
            res = judge_table(pipe, table)
            if report is not None:
                report.add_table(table, res, count_packets=packets is None)
            inv.add_table(table, res)  # outbound rows only
            continue
        if isinstance(flows, FlowTable):
            flows = flows.flows()
        for flow in flows:
            j = pipe.judge(flow) if pipe.is_egress(flow) else None
            if report is not None:
                report.add_flow(flow, count_packets=packets is None, judged=j)
            if j is not None:
                inv.add(j)
                if report is not None:
                    report.add(j)
    for w in getattr(pipe, "register_warnings", []) + pipe.locator.warnings:
        print(f"egress-agent: warning: {w}", file=sys.stderr)
    from agent.output import dumps, render_text, write_output

    data = inv.to_json()
    if args.format == "json":
        write_output(dumps(data, pretty=not args.output and sys.stdout.isatty()), args.output)
    elif args.format == "csv":
        write_output(inv.to_csv(), args.output)
    else:
        render_text(inv.render, args.output)
    if report is not None:  # after the main output, as in audit
        write_report_html(args.html, "egress-agent inventory", report, inv)
    return 1 if data["undeclared"] or data["outside_declared_locations"] else 0
