"""The audit report: totals, destinations by country, verdict counts and every violation.

Contract: feed it input stats with `add_input` and judged flows with `add`; `to_json()` gives the
machine report (fields below are a contract, extend don't rename); `render(console)` prints the
tables people read. Flows are connections (`agent.connections`: both directions, oriented from the
opener). Counting rules: `totals.packets/bytes/flows` cover every connection read, both directions;
`egress_flows` and `destinations_by_country` cover only connections a local host opened to a public
peer, `inbound_flows` and `inbound_by_country` those a public peer opened to a local host (judged
only when a policy asks for inbound). Both tables count connections, and the packets and bytes the
local side sent (`packets`/`bytes`, also as `packets_sent`/`bytes_sent`) and received;
`verdicts` counts one verdict per (judged connection, policy). A reply is never a flow of its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime
from operator import itemgetter

from agent import __version__
from agent.flow import Outcome, iso_time, proto_name
from agent.judge.pipeline import Judged
from agent.sinks.flowrows import flow_line, flow_row, local_counts, sorted_rows
from agent.sinks.records import IsoColumn, RecordBlock, sort_order

MAX_TABLE_ROWS = 40
FLOWS_TABLE_WIDTH = 150  # narrower terminals get the flows one per line
MAX_FLOW_ROWS = 500
_VALUE = {o: o.value for o in Outcome}


def _where(r: dict) -> str:
    if r["country"]:
        return r["country"]
    return f"registered {r['registered_country']}" if r.get("registered_country") else "unknown"


_ORDER = itemgetter("policy", "first_seen", "dst", "dst_port")


def _sorted_records(records: list, raw: bool = False) -> list:
    """Records (dicts, and RecordBlocks from the bulk path) by policy, first seen, destination and
    port (stable), as dicts; with `raw`, a block's records are `orjson.Fragment`s of their JSON
    instead, equal to the dicts' JSON byte for byte. A record without a time sorts first."""
    expanded = []
    for r in records:
        if isinstance(r, RecordBlock):
            if raw:
                import orjson

                expanded += map(orjson.Fragment, r.json())
            else:
                expanded += r.dicts()
        else:
            expanded.append(r)
    order = sort_order(records)
    if order is not None:
        return [expanded[i] for i in order]
    dicts = _expand(records) if raw else expanded  # the sort keys, from the dicts
    try:
        order = sorted(range(len(dicts)), key=lambda i: _ORDER(dicts[i]))
    except TypeError:  # None among the times
        order = sorted(range(len(dicts)), key=lambda i: (dicts[i]["policy"], dicts[i]["first_seen"] or "",
                                                         dicts[i]["dst"], dicts[i]["dst_port"]))
    return [expanded[i] for i in order]


CHUNK_RECORDS = 20_000  # records made into JSON at a time when a report is written (~15 MB of text; a
# larger slice costs more peak memory than it saves time: 100,000 held 200 MB more on a 1M-flow log)


def _record_texts(records: list):
    """The JSON of each record of a kind in its sorted order, as bytes, CHUNK_RECORDS at a time
    (joined with commas). Blocks from the bulk path render only the slice asked for; a list that
    holds dicts is sorted and dumped whole, as before."""
    import orjson

    order = sort_order(records) if all(isinstance(r, RecordBlock) for r in records) else None
    if order is None:
        for f in _sorted_records(records, raw=True):
            yield orjson.dumps(f)
        return
    import numpy as np

    starts, total = [], 0  # each block's first position in the expanded list
    for b in records:
        starts.append(total)
        total += len(b)
    starts.append(total)
    for c in range(0, len(order), CHUNK_RECORDS):
        part = np.asarray(order[c:c + CHUNK_RECORDS], dtype=np.int64)
        # made in record order (each block's rows in memory order: ~3x faster than the sorted
        # order's jumps across its columns), then put in the sorted order
        in_order = bool((part[1:] > part[:-1]).all())  # records already sorted (a log in time order)
        perm = None if in_order else np.argsort(part, kind="stable")
        ks = part if in_order else part[perm]
        cut = np.searchsorted(ks, starts).tolist()  # ks[cut[b]:cut[b + 1]] lie in block b
        if in_order:  # each block's slice as one text (made in one buffer), the blocks' joined
            yield b",".join([blk.json((ks[cut[bi]:cut[bi + 1]] - starts[bi]).tolist(), joined=True)
                             for bi, blk in enumerate(records) if cut[bi + 1] > cut[bi]])
            continue
        texts: list[bytes] = []
        for bi, blk in enumerate(records):
            lo, hi = cut[bi], cut[bi + 1]
            if hi > lo:
                texts += blk.json((ks[lo:hi] - starts[bi]).tolist(), as_bytes=True)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        yield b",".join([texts[j] for j in inv.tolist()])


def _expand(records: list) -> list[dict]:
    out: list[dict] = []
    for r in records:
        if isinstance(r, RecordBlock):
            out += r.dicts()
        else:
            out.append(r)
    return out


def _country_row() -> dict:
    return {"dst": set(), "flows": 0, "packets": 0, "bytes": 0, "packets_received": 0, "bytes_received": 0}


def _country_rows(table: dict, peers: str) -> list[dict]:
    """Rows of a by-country table: connections, and what the local side sent and received."""
    rows = [{"country": cc, peers: len(v["dst"]), "flows": v["flows"], "packets": v["packets"], "bytes": v["bytes"],
             "packets_sent": v["packets"], "bytes_sent": v["bytes"], "packets_received": v["packets_received"],
             "bytes_received": v["bytes_received"]} for cc, v in table.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["country"] or "~"))


class AuditReport:
    def __init__(self, policies, geoip_provenance, with_flows: bool = False):
        self.inputs: list[dict] = []
        self.policies = [{"name": p.name, "file": p.file, "sha256": p.sha256} for p in policies]
        self.geoip = geoip_provenance
        self.totals = Counter(packets=0, bytes=0, flows=0, egress_flows=0, inbound_flows=0)
        self.verdicts = Counter({o.value: 0 for o in Outcome})
        self.by_country: dict = defaultdict(_country_row)
        self.by_peer_country: dict = defaultdict(_country_row)  # inbound connections
        self.by_jurisdiction: Counter = Counter()
        # per kind: record dicts (`add`) and RecordBlocks (`add_table`), in the order they came
        self.records: dict[str, list] = {"violation": [], "indeterminate": [], "exempt": []}
        self.redated: list[dict] = []
        self.warnings: list[str] = []
        self.flows: list[dict] | None = [] if with_flows else None
        self.flow_tables: list[tuple] = []  # (FlowTable, TableJudgement) of the bulk path, with `flows`
        self.span: list[float] = []  # [earliest first seen, latest last seen] of the flows read (0: no time)

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
        if flow.first_seen:
            self._widen(flow.first_seen, flow.last_seen or flow.first_seen)
        self.totals["bytes"] += flow.bytes + flow.bytes_reply
        if count_packets:
            self.totals["packets"] += flow.packets + flow.packets_reply

    def _widen(self, first: float, last: float):
        if not self.span:
            self.span = [first, last]
        else:
            self.span = [min(self.span[0], first), max(self.span[1], last)]

    def record_counts(self, kind: str) -> Counter:
        """(policy, severity) -> how many records of this outcome kind, without making the records."""
        out: Counter = Counter()
        for r in self.records[kind]:
            if isinstance(r, RecordBlock):
                for _i, _g, (v, _wf) in r.pairs():
                    out[(v.policy, v.severity)] += 1
            else:
                out[(r["policy"], r["severity"])] += 1
        return out

    def time_range(self) -> dict:
        """The span of the flows read ({first_seen, last_seen} in ISO time; None without times)."""
        if not self.span:
            return {"first_seen": None, "last_seen": None}
        return {"first_seen": iso_time(self.span[0]), "last_seen": iso_time(self.span[1])}

    def add(self, j: Judged):
        f, loc = j.flow, j.location
        self.totals["inbound_flows" if j.inbound else "egress_flows"] += 1
        counts = local_counts(f, j.inbound)
        c = (self.by_peer_country if j.inbound else self.by_country)[loc.country if loc.unknown_reason is None
                                                                       else None]
        c["dst"].add(j.peer)
        c["flows"] += 1
        c["packets"] += counts["packets_sent"]
        c["bytes"] += counts["bytes_sent"]
        c["packets_received"] += counts["packets_received"]
        c["bytes_received"] += counts["bytes_received"]
        if not j.inbound:
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
                base = {"src": f.src, "sport": f.sport, "dst": f.dst, "dst_port": f.dport, "dport": f.dport,
                        "proto": proto_name(f.proto),
                        "direction": "inbound" if j.inbound else "outbound",
                        "country": loc.country, "registered_country": loc.registered_country, "asn": loc.asn,
                        "as_org": loc.as_org, "packets": f.packets, "bytes": f.bytes, **counts,
                        "opened_by": f.opened_by,
                        "first_seen": iso_time(f.first_seen), "last_seen": iso_time(f.last_seen),
                        "process": f.to_json().get("process") if f.who is not None else None,
                        "hostname": f.hostname, "hostname_source": f.hostname_source,
                        "recipient": j.recipient.id if j.recipient is not None else None}
            records.append({"policy": v.policy, "severity": v.severity, "reason": v.reason,
                            "message": j.message(v), "exception": v.exception, **base})

    def add_table(self, t, res, count_packets: bool):
        """Count every row of a FlowTable and add its judgements (`agent.judge.bulk.judge_table`): the
        same report as `add_flow` and `add` per row, in row order, without a Python object per
        flow. Rows judged one by one (`res.scalar`) go through `add` itself."""
        import numpy as np

        from agent.flow import iso_parts
        from agent.policy.engine import peer_prefix

        n = len(t)
        if self.flows is not None:  # `flows` rows are made from the table when written (flow_rows)
            self.flow_tables.append((t, res))
        self.totals["flows"] += n
        timed = t.first > 0
        if timed.any():
            self._widen(float(t.first[timed].min()), float(np.maximum(t.last, t.first)[timed].max()))
        pkr = t.packets_reply if t.packets_reply is not None else np.zeros(n, dtype=np.int64)
        byr = t.bytes_reply if t.bytes_reply is not None else np.zeros(n, dtype=np.int64)
        self.totals["bytes"] += int(t.bytes.sum()) + int(byr.sum())
        if count_packets:
            self.totals["packets"] += int(t.packets.sum()) + int(pkr.sum())
        bulk = np.flatnonzero(res.key >= 0)
        key = res.key[bulk]
        k = len(res.reps)
        flows_k = np.bincount(key, minlength=k)
        bytes_k = np.bincount(key, weights=t.bytes[bulk], minlength=k).astype(np.int64).tolist()
        packets_k = np.bincount(key, weights=t.packets[bulk], minlength=k).astype(np.int64).tolist()
        rbytes_k = np.bincount(key, weights=byr[bulk], minlength=k).astype(np.int64).tolist()
        rpackets_k = np.bincount(key, weights=pkr[bulk], minlength=k).astype(np.int64).tolist()
        self.totals["egress_flows"] += len(bulk)
        country_k = [rep.location.country if rep.location.unknown_reason is None else None for rep in res.reps]
        for g, rep in enumerate(res.reps):
            c = self.by_country[country_k[g]]
            c["flows"] += int(flows_k[g])
            c["packets"] += packets_k[g]
            c["bytes"] += bytes_k[g]
            c["packets_received"] += rpackets_k[g]
            c["bytes_received"] += rbytes_k[g]
            for v in rep.outcomes:
                self.verdicts[_VALUE[v.outcome]] += int(flows_k[g])
        dst_text = t.dst.text
        di = t.dst.inverse
        # distinct destinations per country. A group's country is its destination's (the location is
        # the destination's alone), so each destination in use has one country: a presence count and
        # one country per destination, O(n), then one set update per country
        country_id = {c: i for i, c in enumerate(dict.fromkeys(country_k))}
        group_country = np.array([country_id[c] for c in country_k], dtype=np.int64)
        used = np.flatnonzero(np.bincount(di[bulk], minlength=len(dst_text))) if len(bulk) else \
            np.zeros(0, dtype=np.int64)
        dst_country = np.full(len(dst_text), -1, dtype=np.int64)
        dst_country[di[bulk]] = group_country[key]
        used_country = dst_country[used]
        for c, i in country_id.items():
            self.by_country[c]["dst"].update(map(dst_text.__getitem__, used[used_country == i].tolist()))
        # Jurisdictions in the order the per-row path meets them (equal byte counts keep that order):
        # the first row of each group, and the rows judged one by one, which `add` takes whole.
        first_of = {r: g for g, r in enumerate(res.rep_rows)}
        for r in sorted(set(first_of) | set(res.scalar)):
            j = res.scalar.get(r)
            if j is not None:
                self.add(j)
                continue
            g = first_of[r]
            for grp in res.reps[g].jurisdictions:
                self.by_jurisdiction[grp] += bytes_k[g]
        # Records of the reported verdicts, in row order per kind. (Rows judged one by one are inbound
        # or redated: their sort keys never equal a bulk row's, so appending them separately leaves
        # the sorted lists as the per-row path makes them.)
        reported = [g for g, rep in enumerate(res.reps) if any(_VALUE[v.outcome] in self.records for v in rep.outcomes)]
        rr = bulk[np.isin(key, reported)] if reported else np.zeros(0, dtype=np.int64)
        if not len(rr):
            return
        groups = res.key[rr].tolist()
        rows = rr.tolist()
        host = t.hostname[rr].tolist() if t.hostname is not None else [None] * len(rows)
        hsrc = t.hostname_source[rr].tolist() if t.hostname_source is not None else [None] * len(rows)
        process = [t.flow(r).to_json().get("process") if t.who[r] is not None else None for r in rows] \
            if t.who is not None else [None] * len(rows)
        src_text = t.src.text
        src = [src_text[i] for i in t.src.inverse[rr].tolist()]
        dst = [dst_text[i] for i in di[rr].tolist()]
        names = {p: proto_name(p) for p in np.unique(t.proto[rr]).tolist()}
        proto = [names[p] for p in t.proto[rr].tolist()]
        if t.hostname is None:  # peer_prefix without a name is "destination ADDR (": made where needed
            prefix = None      # (RecordBlock: ~75 MB of strings per million rows otherwise)
        else:
            prefix = [peer_prefix(d, False, h, hs) for d, h, hs in zip(dst, host, hsrc, strict=True)]
        first = iso_parts(t.first[rr])
        from agent.flow import OPENED_BY

        opened = [OPENED_BY[o] for o in t.opened[rr].tolist()] if t.opened is not None else [None] * len(rows)
        cols = (groups, src, t.sport[rr].tolist(), dst, t.dport[rr].tolist(), proto, t.packets[rr].tolist(),
                t.bytes[rr].tolist(), IsoColumn.of(t.first[rr], first), IsoColumn.of(t.last[rr]), process, host, hsrc,
                prefix, pkr[rr].tolist(), byr[rr].tolist(), opened)
        loc = [(rep.location.country, rep.location.registered_country, rep.location.asn, rep.location.as_org,
                rep.recipient.id if rep.recipient is not None else None) for rep in res.reps]
        for kind, records in self.records.items():
            per_group = [[(v, rep._for) for v in rep.outcomes if _VALUE[v.outcome] == kind] for rep in res.reps]
            if any(per_group):
                records.append(RecordBlock(per_group, cols, loc, first))

    def destinations_by_country(self) -> list[dict]:
        return _country_rows(self.by_country, "distinct_dst")

    def inbound_by_country(self) -> list[dict]:
        return _country_rows(self.by_peer_country, "distinct_src")

    def to_json(self, raw: bool = False, placeholders: dict | None = None) -> dict:
        """The machine report. With `raw`, records the bulk path made are `orjson.Fragment`s (for
        `to_json_bytes`); otherwise every record is a dict. With `placeholders` (kind -> text), each
        record list is that string instead, for `json_chunks` to splice the records in."""
        out = {
            "tool": {"name": "egress-agent", "version": __version__},
            "generated_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "inputs": self.inputs,
            "geoip": self.geoip,
            "policies": self.policies,
            "totals": dict(self.totals),
            "time_range": self.time_range(),
            "destinations_by_country": self.destinations_by_country(),
            "inbound_by_country": self.inbound_by_country(),
            "jurisdictions_by_bytes": [{"jurisdiction": k, "bytes": b} for k, b in self.by_jurisdiction.most_common()],
            "verdicts": dict(self.verdicts),
            "violations": placeholders["violation"] if placeholders else
            _sorted_records(self.records["violation"], raw),
            "indeterminate": placeholders["indeterminate"] if placeholders else
            _sorted_records(self.records["indeterminate"], raw),
            "exempt": placeholders["exempt"] if placeholders else _sorted_records(self.records["exempt"], raw),
            "redated": self.redated,
            "warnings": self.warnings + self._redated_warning(),
        }
        if self.flows is not None:
            out["flows"] = placeholders["flows"] if placeholders else [r for c in self.flow_rows() for r in c]
        return out

    def first_records(self, kind: str, n: int) -> list[dict]:
        """The first n records of a kind in the report's order, as dicts, without the others'."""
        import orjson

        out: list = []
        for text in _record_texts(self.records[kind]):
            out += orjson.loads(b"[" + text + b"]")
            if len(out) >= n:
                break
        return out[:n]

    def record_count(self, kind: str) -> int:
        return sum(len(r) if isinstance(r, RecordBlock) else 1 for r in self.records[kind])

    def record_times(self, kind: str) -> list[tuple[str, str | None]]:
        """(policy, first_seen) of every record of a kind, in no particular order, without their dicts."""
        out: list = []
        for r in self.records[kind]:
            if isinstance(r, RecordBlock):
                fs, pairs = r.cols[8], r.pairs()
                rows = [i for i, _g, _e in pairs]
                texts = fs.texts(rows) if isinstance(fs, IsoColumn) else [fs[i] for i in rows]
                out += [(v.policy, t) for (_i, _g, (v, _wf)), t in zip(pairs, texts, strict=True)]
            else:
                out.append((r["policy"], r.get("first_seen")))
        return out

    def flow_rows(self, chunk: int = 20_000):
        """The `flows` list (`audit --flows`) in its sorted order, `chunk` rows at a time
        (`agent.sinks.flowrows.sorted_rows`)."""
        return sorted_rows(self.flows or [], self.flow_tables, chunk)

    def to_json_bytes(self) -> bytes:
        """`orjson.dumps(to_json())` plus a newline, made without a dict per bulk record. Falls back to
        the dicts where orjson refuses a value (an integer beyond 64 bits)."""
        return b"".join(self.json_chunks())

    def json_chunks(self):
        """`to_json_bytes` as pieces, so a report of a million records is written a slice at a time:
        the record arrays are made CHUNK_RECORDS at a time (in their sorted order) and spliced into
        the rest of the report where placeholders stood. The pieces join to exactly the bytes
        `orjson.dumps(to_json())` makes."""
        from agent.output import dumps

        try:
            import orjson
        except ImportError:
            yield dumps(self.to_json(), pretty=False)
            return
        import secrets

        marks = {kind: f"egress-agent-records-{secrets.token_hex(8)}-{kind}" for kind in (*self.records, "flows")}
        try:
            head = orjson.dumps(self.to_json(raw=True, placeholders=marks), option=orjson.OPT_APPEND_NEWLINE)
            # dicts (records judged one by one) are dumped up front, where a refusal can still fall
            # back; bulk blocks are made a slice at a time while writing
            pieces = [(kind, _record_texts(recs) if all(isinstance(r, RecordBlock) for r in recs)
                       else list(_record_texts(recs))) for kind, recs in self.records.items()]
        except TypeError:  # a value orjson refuses (an integer beyond 64 bits): the dicts, through json
            yield dumps(self.to_json(), pretty=False)
            return
        if self.flows is not None:  # the flows list last, as it stands last in the report
            pieces.append(("flows", (b",".join(map(orjson.dumps, rows)) for rows in self.flow_rows() if rows)))
        rest = head
        for kind, texts in pieces:
            before, sep, rest = rest.partition(f'"{marks[kind]}"'.encode())
            assert sep, "placeholder missing from the report"
            yield before
            yield b"["
            for k, chunk in enumerate(texts):
                if k:
                    yield b","  # apart: joining would copy each multi-megabyte chunk once more
                yield chunk
            yield b"]"
        yield rest

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
            t.add_column(col, overflow="fold")  # a path folds onto the next line, never cut to "…"
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
        console.print(f"Totals: {tot['packets']} packets, {tot['bytes']} bytes, {tot['flows']} connections, "
                      f"{tot['egress_flows']} egress, {tot['inbound_flows']} inbound (judged)")
        for title, rows, peers in (("Egress destinations by country", self.destinations_by_country(), "distinct_dst"),
                                   ("Inbound connections by peer country", self.inbound_by_country(), "distinct_src")):
            if not rows and peers == "distinct_src":
                continue
            t = Table(title=title, title_justify="left")
            for col in ("country", "peers", "connections", "packets sent", "bytes sent", "bytes received"):
                t.add_column(col, justify="right" if col != "country" else "left")
            for r in rows[:MAX_TABLE_ROWS]:
                t.add_row(r["country"] or "[yellow]unknown[/]", str(r[peers]), str(r["flows"]),
                          str(r["packets_sent"]), str(r["bytes_sent"]), str(r["bytes_received"]))
            console.print(t)
        console.print("Verdicts: " + ", ".join(f"{k} {v}" for k, v in self.verdicts.items()))
        for w in self._redated_warning():
            console.print(f"[yellow]{w}[/]")
        for kind, style in (("violation", "red"), ("indeterminate", "yellow")):
            groups: dict = {}
            records = _expand(self.records[kind])
            for r in records:
                g = groups.setdefault((r["policy"], r["dst"], r["dst_port"], r["proto"], r["direction"]),
                                      {"first": r, "flows": 0, "bytes": 0, "packets": 0, "srcs": set()})
                g["flows"] += 1
                g["bytes"] += r["bytes"]
                g["packets"] += r["packets"]
                g["srcs"].add(r["src"])
            if not groups:
                continue
            self._render_summary(console, kind, style, records)
            console.print(f"[bold {style}]{kind.capitalize()}s: {len(records)} connection(s) "
                          f"to {len(groups)} destination(s)[/]")
            ranked = sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[1]["bytes"]))
            for (policy, dst, port, proto, direction), g in ranked[:MAX_TABLE_ROWS]:
                r = g["first"]
                srcs = ", ".join(sorted(g["srcs"])[:3]) + (" …" if len(g["srcs"]) > 3 else "")
                named = f" {r['hostname']}" if r.get("hostname") else ""
                if direction == "inbound":  # the peer opened it: say who, to which local host
                    console.print(f"  [{style}]{policy}[/] \\[{r['severity']}] inbound {proto} from {srcs} "
                                  f"({_where(r)}) to {dst} port {port}: {g['flows']} connection(s), "
                                  f"{g['packets']} packets, {g['bytes']} bytes", highlight=False)
                else:
                    console.print(f"  [{style}]{policy}[/] \\[{r['severity']}] {proto} {dst}{named} port {port} "
                                  f"({_where(r)}): {g['flows']} connection(s), {g['packets']} packets, "
                                  f"{g['bytes']} bytes from {srcs}", highlight=False)
                console.print(f"      {r['message']}", highlight=False, style="dim")
            if len(ranked) > MAX_TABLE_ROWS:
                console.print(f"  … and {len(ranked) - MAX_TABLE_ROWS} more destinations (--format json lists all)")
        if self.flows is not None:
            self._render_flows(console)

    @staticmethod
    def _render_summary(console, kind: str, style: str, records: list):
        """What a reader wants first: counts by policy, country and recipient, before the sentences."""
        from rich.table import Table

        counts: dict = {}
        for r in records:
            key = (r["policy"], _where(r), r.get("recipient") or "-", r["direction"])
            c = counts.setdefault(key, [0, set()])
            c[0] += 1
            c[1].add(r["dst"] if r["direction"] == "outbound" else r["src"])
        t = Table(title=f"{kind.capitalize()}s by policy, country and recipient", title_justify="left",
                  title_style=f"bold {style}")
        for col in ("policy", "country", "recipient", "direction", "connections", "peers"):
            t.add_column(col, justify="right" if col in ("connections", "peers") else "left", overflow="fold")
        for (policy, where, rcp, direction), (n, peers) in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1][0])):
            t.add_row(policy, where, rcp, direction, str(n), str(len(peers)))
        console.print(t)

    def _render_flows(self, console):
        from rich.table import Table

        total = len(self.flows) + sum(len(t) for t, _res in self.flow_tables)
        rows = next(self.flow_rows(MAX_FLOW_ROWS), [])  # the first ones shown: no dict for the rest
        if console.is_terminal and console.width < FLOWS_TABLE_WIDTH:
            # a terminal too narrow for the table: one flow per line, key=value, as `conntrack -L`
            # does, so no column is squeezed to "desti…" and no address is ever cut
            console.print(f"[bold]Flows ({total})[/]")
            for r in rows:
                console.print(flow_line(r), highlight=False, markup=False)
            if total > MAX_FLOW_ROWS:
                console.print(f"… and {total - MAX_FLOW_ROWS} more flows (--format json lists all)")
            return
        t = Table(title=f"Flows ({total})", title_justify="left")
        cols = ("first seen", "proto", "opened by", "source", "destination", "host name", "country", "packets",
                "bytes", "verdicts")
        for col in cols:
            t.add_column(col, justify="right" if col in ("packets", "bytes") else "left")
        for r in rows[:MAX_FLOW_ROWS]:
            host = f"{r['hostname']} ({r['hostname_source']})" if r["hostname"] else ""
            verdicts = ", ".join(f"{p}: {o}" for p, o in r["verdicts"].items() if o != "not_applicable") or \
                ("-" if not r["direction"] else "not applicable")
            t.add_row(r["first_seen"] or "", r["proto"], r["opened_by"] or "", f"{r['src']}:{r['sport']}",
                      f"{r['dst']}:{r['dport']}", host,
                      r["country"] or ("" if not r["direction"] else "unknown"), str(r["packets"]), str(r["bytes"]),
                      verdicts)
        console.print(t)
        if total > MAX_FLOW_ROWS:
            console.print(f"… and {total - MAX_FLOW_ROWS} more flows (--format json lists all)")
