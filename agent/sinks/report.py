"""The audit report: totals, destinations by country, verdict counts and every violation.

Contract: feed it input stats with `add_input` and judged flows with `add`; `to_json()` gives the
machine report (fields below are a contract, extend don't rename); `render(console)` prints the
tables people read. Counting rules: `totals.packets/bytes/flows` cover every IP flow read;
`egress_flows` and `destinations_by_country` cover only egress to public destinations; `verdicts`
counts one verdict per (egress flow, policy).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime

from agent import __version__
from agent.flow import Outcome, iso_time, proto_name
from agent.pipeline import Judged

MAX_TABLE_ROWS = 40
MAX_FLOW_ROWS = 500
_VALUE = {o: o.value for o in Outcome}


def _where(r: dict) -> str:
    if r["country"]:
        return r["country"]
    return f"registered {r['registered_country']}" if r.get("registered_country") else "unknown"


def flow_row(flow, j: Judged | None) -> dict:
    """One entry of the report's `flows` list (`audit --flows`): field names as in `violations`,
    plus `dport` (the name the flow log uses) and the verdict of each policy."""
    loc = j.location if j is not None else None
    return {"proto": proto_name(flow.proto), "src": flow.src, "sport": flow.sport, "dst": flow.dst,
            "dport": flow.dport, "dst_port": flow.dport, "packets": flow.packets, "bytes": flow.bytes,
            "first_seen": iso_time(flow.first_seen) if flow.first_seen else None,
            "last_seen": iso_time(flow.last_seen) if flow.last_seen else None,
            "egress": j is not None and not j.inbound, "direction": ("inbound" if j.inbound else "outbound") if j
            else None, "country": loc.country if loc is not None and loc.unknown_reason is None else None,
            "hostname": flow.hostname, "hostname_source": flow.hostname_source,
            "recipient": j.recipient.id if j is not None and j.recipient is not None else None,
            "verdicts": {v.policy: v.outcome.value for v in j.outcomes} if j is not None else {}}


class AuditReport:
    def __init__(self, policies, geoip_provenance, with_flows: bool = False):
        self.inputs: list[dict] = []
        self.policies = [{"name": p.name, "file": p.file, "sha256": p.sha256} for p in policies]
        self.geoip = geoip_provenance
        self.totals = Counter(packets=0, bytes=0, flows=0, egress_flows=0, inbound_flows=0)
        self.verdicts = Counter({o.value: 0 for o in Outcome})
        self.by_country: dict = defaultdict(lambda: {"dst": set(), "flows": 0, "packets": 0, "bytes": 0})
        self.by_jurisdiction: Counter = Counter()
        self.records: dict[str, list] = {"violation": [], "indeterminate": [], "exempt": []}
        self.redated: list[dict] = []
        self.warnings: list[str] = []
        self.flows: list[dict] | None = [] if with_flows else None

    def add_input(self, stats: dict, packets: int | None = None):
        self.inputs.append(stats)
        self.warnings.extend(stats.get("warnings", []))
        if packets is not None:
            self.totals["packets"] += packets

    def add_flow(self, flow, count_packets: bool, judged: Judged | None = None):
        """Count one flow read; `judged` is its judgement when it was judged (egress or inbound)."""
        if self.flows is not None:
            self.flows.append(flow_row(flow, judged))
        self.totals["flows"] += 1
        self.totals["bytes"] += flow.bytes
        if count_packets:
            self.totals["packets"] += flow.packets

    def add(self, j: Judged):
        f, loc = j.flow, j.location
        self.totals["inbound_flows" if j.inbound else "egress_flows"] += 1
        c = self.by_country[loc.country if loc.unknown_reason is None else None]
        c["dst"].add(j.peer)
        c["flows"] += 1
        c["packets"] += f.packets
        c["bytes"] += f.bytes
        for g in j.jurisdictions:
            self.by_jurisdiction[g] += f.bytes
        if j.redated is not None:
            self.redated.append({"src": f.src, "sport": f.sport, "dst": f.dst, "dst_port": f.dport,
                                 "proto": proto_name(f.proto), "first_seen": iso_time(f.first_seen) if f.first_seen
                                 else None, "judged_at": j.judged_at.isoformat(), "reason": j.redated})
        base = None
        verdicts = self.verdicts
        for v in j.outcomes:
            outcome = _VALUE[v.outcome]
            verdicts[outcome] += 1
            records = self.records.get(outcome)
            if records is None:
                continue
            if base is None:  # the flow's part of a record, built once for all its reported verdicts
                base = {"src": f.src, "sport": f.sport, "dst": f.dst, "dst_port": f.dport, "proto": proto_name(f.proto),
                        "direction": "inbound" if j.inbound else "outbound",
                        "country": loc.country, "registered_country": loc.registered_country, "asn": loc.asn,
                        "as_org": loc.as_org, "packets": f.packets, "bytes": f.bytes,
                        "first_seen": iso_time(f.first_seen), "last_seen": iso_time(f.last_seen),
                        "process": f.to_json().get("process") if f.who is not None else None,
                        "hostname": f.hostname, "hostname_source": f.hostname_source,
                        "recipient": j.recipient.id if j.recipient is not None else None}
            records.append({"policy": v.policy, "severity": v.severity, "reason": v.reason,
                            "message": j.message(v), "exception": v.exception, **base})

    def add_table(self, t, res, count_packets: bool):
        """Count every row of a FlowTable and add its judgements (`agent.bulk.judge_table`): the
        same report as `add_flow` and `add` per row, in row order, without a Python object per
        flow. Rows judged one by one (`res.scalar`) go through `add` itself."""
        import numpy as np

        from agent.flow import iso_times
        from agent.pipeline import rewrite_message
        from agent.policy.engine import PEER_NOUN, peer_prefix

        n = len(t)
        self.totals["flows"] += n
        self.totals["bytes"] += int(t.bytes.sum())
        if count_packets:
            self.totals["packets"] += int(t.packets.sum())
        bulk = np.flatnonzero(res.key >= 0)
        key = res.key[bulk]
        k = len(res.reps)
        flows_k = np.bincount(key, minlength=k)
        bytes_k = np.bincount(key, weights=t.bytes[bulk], minlength=k).astype(np.int64).tolist()
        packets_k = np.bincount(key, weights=t.packets[bulk], minlength=k).astype(np.int64).tolist()
        self.totals["egress_flows"] += len(bulk)
        country_k = [rep.location.country if rep.location.unknown_reason is None else None for rep in res.reps]
        for g, rep in enumerate(res.reps):
            c = self.by_country[country_k[g]]
            c["flows"] += int(flows_k[g])
            c["packets"] += packets_k[g]
            c["bytes"] += bytes_k[g]
            for v in rep.outcomes:
                self.verdicts[_VALUE[v.outcome]] += int(flows_k[g])
        dst_text = t.dst.text
        di = t.dst.inverse
        nd = len(dst_text)
        for p in np.unique(key * nd + di[bulk]).tolist():
            self.by_country[country_k[p // nd]]["dst"].add(dst_text[p % nd])
        # Rows in the order the per-row path meets them: jurisdictions (first row of each group, for
        # the order of equal byte counts), records of reported verdicts, and rows judged one by one.
        reported = [g for g, rep in enumerate(res.reps) if any(_VALUE[v.outcome] in self.records for v in rep.outcomes)]
        report_rows = bulk[np.isin(key, reported)] if reported else np.zeros(0, dtype=np.int64)
        first_of = {r: g for g, r in enumerate(res.rep_rows)}
        rows = np.union1d(np.union1d(report_rows, np.array(res.rep_rows, dtype=np.int64)),
                          np.array(sorted(res.scalar), dtype=np.int64)).tolist()
        rr = np.array(rows, dtype=np.int64)
        first_iso = iso_times(t.first[rr]) if rows else []
        last_iso = iso_times(t.last[rr]) if rows else []
        src_text, si = t.src.text, t.src.inverse
        is_reported = set(report_rows.tolist())
        host, host_src, who = t.hostname, t.hostname_source, t.who
        cols = zip(rows, res.key[rr].tolist(), si[rr].tolist(), di[rr].tolist(), t.sport[rr].tolist(),
                   t.dport[rr].tolist(), t.proto[rr].tolist(), t.packets[rr].tolist(), t.bytes[rr].tolist(),
                   first_iso, last_iso, strict=True)
        # per group: its location fields, and per reported verdict the parts every record shares and
        # the message after the description prefix (the prefix names each flow's destination)
        loc_fields = [(rep.location.country, rep.location.registered_country, rep.location.asn, rep.location.as_org)
                      for rep in res.reps]
        reported_v = []
        for rep in res.reps:
            old_prefix = rep._for[1]
            reported_v.append([(self.records[_VALUE[v.outcome]], v, v.message[len(old_prefix):]
                                if v.message.startswith(old_prefix) else None)
                               for v in rep.outcomes if _VALUE[v.outcome] in self.records])
        for r, g, s_i, d_i, sport, dport, proto, packets, nbytes, first_seen, last_seen in cols:
            if g < 0:
                self.add(res.scalar[r])
                continue
            rep = res.reps[g]
            if r in first_of:
                for grp in rep.jurisdictions:
                    self.by_jurisdiction[grp] += bytes_k[g]
            if r not in is_reported:
                continue
            hostname = host[r] if host is not None else None
            hsrc = host_src[r] if host_src is not None else None
            dst = dst_text[d_i]
            country, registered, asn, as_org = loc_fields[g]
            process = t.flow(r).to_json().get("process") if who is not None and who[r] is not None else None
            prefix = peer_prefix(dst, False, hostname, hsrc) if hostname else f"{PEER_NOUN[False]} {dst} ("
            src, pname = src_text[s_i], proto_name(proto)
            for records, v, tail in reported_v[g]:
                records.append({"policy": v.policy, "severity": v.severity, "reason": v.reason,
                                "message": prefix + tail if tail is not None else
                                rewrite_message(v.message, rep._for, dst, prefix, False),
                                "exception": v.exception, "src": src, "sport": sport, "dst": dst, "dst_port": dport,
                                "proto": pname, "direction": "outbound", "country": country,
                                "registered_country": registered, "asn": asn, "as_org": as_org, "packets": packets,
                                "bytes": nbytes, "first_seen": first_seen, "last_seen": last_seen, "process": process,
                                "hostname": hostname, "hostname_source": hsrc, "recipient": None})

    def destinations_by_country(self) -> list[dict]:
        rows = [{"country": cc, "distinct_dst": len(v["dst"]), "flows": v["flows"], "packets": v["packets"],
                 "bytes": v["bytes"]} for cc, v in self.by_country.items()]
        return sorted(rows, key=lambda r: (-r["bytes"], r["country"] or "~"))

    def to_json(self) -> dict:
        order = lambda r: (r["policy"], r["first_seen"] or "", r["dst"], r["dst_port"])  # noqa: E731
        out = {
            "tool": {"name": "egress-agent", "version": __version__},
            "generated_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "inputs": self.inputs,
            "geoip": self.geoip,
            "policies": self.policies,
            "totals": dict(self.totals),
            "destinations_by_country": self.destinations_by_country(),
            "jurisdictions_by_bytes": [{"jurisdiction": k, "bytes": b} for k, b in self.by_jurisdiction.most_common()],
            "verdicts": dict(self.verdicts),
            "violations": sorted(self.records["violation"], key=order),
            "indeterminate": sorted(self.records["indeterminate"], key=order),
            "exempt": sorted(self.records["exempt"], key=order),
            "redated": self.redated,
            "warnings": self.warnings + self._redated_warning(),
        }
        if self.flows is not None:
            out["flows"] = sorted(self.flows, key=lambda r: (r["first_seen"] or "", r["src"], r["sport"], r["dst"],
                                                             r["dport"], r["proto"]))
        return out

    def _redated_warning(self) -> list[str]:
        if not self.redated:
            return []
        days = sorted({r["judged_at"] for r in self.redated})
        reasons = sorted({r["reason"].split(" is ")[-1] if " is " in r["reason"] else r["reason"]
                          for r in self.redated})
        return [f"{len(self.redated)} flow(s) had no plausible time ({'; '.join(reasons)}) and were judged as of "
                f"{', '.join(days)} (--as-of); listed under \"redated\""]

    def render(self, console):
        from rich.table import Table

        t = Table(title="Inputs", title_justify="left")
        for col in ("path", "format", "link types", "packets", "malformed", "truncated"):
            t.add_column(col)
        for i in self.inputs:
            t.add_row(i["path"], i["format"], ", ".join(i.get("link_types") or []) or "-",
                      str(i.get("packets") if i.get("packets") is not None else i.get("flows", "")),
                      str(i.get("malformed", 0)), "yes" if i.get("truncated") else "no")
        console.print(t)
        geo = "; ".join(f"{g['database_type']} {g.get('build_date') or g.get('version') or ''}".strip()
                        for g in self.geoip)
        console.print(f"GeoIP: {geo}")
        console.print(f"Policies: {', '.join(p['name'] for p in self.policies)}")
        tot = self.totals
        console.print(f"Totals: {tot['packets']} packets, {tot['bytes']} bytes, {tot['flows']} flows, "
                      f"{tot['egress_flows']} egress flows")
        t = Table(title="Egress destinations by country", title_justify="left")
        for col in ("country", "destinations", "flows", "packets", "bytes"):
            t.add_column(col, justify="right" if col != "country" else "left")
        for r in self.destinations_by_country()[:MAX_TABLE_ROWS]:
            t.add_row(r["country"] or "[yellow]unknown[/]", str(r["distinct_dst"]), str(r["flows"]),
                      str(r["packets"]), str(r["bytes"]))
        console.print(t)
        console.print("Verdicts: " + ", ".join(f"{k} {v}" for k, v in self.verdicts.items()))
        for w in self._redated_warning():
            console.print(f"[yellow]{w}[/]")
        for kind, style in (("violation", "red"), ("indeterminate", "yellow")):
            groups: dict = {}
            for r in self.records[kind]:
                g = groups.setdefault((r["policy"], r["dst"], r["dst_port"], r["proto"]),
                                      {"first": r, "flows": 0, "bytes": 0, "packets": 0, "srcs": set()})
                g["flows"] += 1
                g["bytes"] += r["bytes"]
                g["packets"] += r["packets"]
                g["srcs"].add(r["src"])
            if not groups:
                continue
            console.print(f"[bold {style}]{kind.capitalize()}s: {len(self.records[kind])} flow(s) "
                          f"to {len(groups)} destination(s)[/]")
            ranked = sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[1]["bytes"]))
            for (policy, dst, port, proto), g in ranked[:MAX_TABLE_ROWS]:
                r = g["first"]
                srcs = ", ".join(sorted(g["srcs"])[:3]) + (" …" if len(g["srcs"]) > 3 else "")
                named = f" {r['hostname']}" if r.get("hostname") else ""
                console.print(f"  [{style}]{policy}[/] \\[{r['severity']}] {proto} {dst}{named} port {port} "
                              f"({_where(r)}): {g['flows']} flow(s), {g['packets']} packets, "
                              f"{g['bytes']} bytes from {srcs}", highlight=False)
                console.print(f"      {r['message']}", highlight=False, style="dim")
            if len(ranked) > MAX_TABLE_ROWS:
                console.print(f"  … and {len(ranked) - MAX_TABLE_ROWS} more destinations (--format json lists all)")
        if self.flows is not None:
            self._render_flows(console)

    def _render_flows(self, console):
        from rich.table import Table

        rows = self.to_json()["flows"]
        t = Table(title=f"Flows ({len(rows)})", title_justify="left")
        cols = ("first seen", "proto", "source", "destination", "host name", "country", "packets", "bytes", "verdicts")
        for col in cols:
            t.add_column(col, justify="right" if col in ("packets", "bytes") else "left")
        for r in rows[:MAX_FLOW_ROWS]:
            host = f"{r['hostname']} ({r['hostname_source']})" if r["hostname"] else ""
            verdicts = ", ".join(f"{p}: {o}" for p, o in r["verdicts"].items() if o != "not_applicable") or \
                ("-" if not r["direction"] else "not applicable")
            t.add_row(r["first_seen"] or "", r["proto"], f"{r['src']}:{r['sport']}", f"{r['dst']}:{r['dport']}", host,
                      r["country"] or ("" if not r["direction"] else "unknown"), str(r["packets"]), str(r["bytes"]),
                      verdicts)
        console.print(t)
        if len(rows) > MAX_FLOW_ROWS:
            console.print(f"… and {len(rows) - MAX_FLOW_ROWS} more flows (--format json lists all)")
