"""The `flows` list of an audit report (`audit --flows`): one row per connection read, with its
verdicts, as dicts (`flow_row`, the per-flow path) or made in bulk from a FlowTable's columns
(`table_rows`), merged and sorted by `sorted_rows`; and the terminal's one-line form (`flow_line`).

Contract: `table_rows(t, res, rows)` gives exactly the dicts `flow_row(t.flow(i), judgement)` gives
(tests/test_bulk.py holds whole reports made both ways equal).
"""

from __future__ import annotations

from agent.flow import flag_letters, iso_time, proto_name
from agent.judge.pipeline import Judged


def local_counts(flow, inbound: bool) -> dict:
    """What the local side of a connection sent and received (inbound: the responder is local)."""
    sent = (flow.packets_reply, flow.bytes_reply) if inbound else (flow.packets, flow.bytes)
    got = (flow.packets, flow.bytes) if inbound else (flow.packets_reply, flow.bytes_reply)
    return {"packets_sent": sent[0], "bytes_sent": sent[1], "packets_received": got[0], "bytes_received": got[1]}


def flow_line(r: dict) -> str:
    """One `flows` entry as a few short lines (the connection, then key=value facts, then its
    verdicts, indented): what `audit --flows` shows on a terminal too narrow for the table."""
    where = r["country"] or ("unknown" if r["direction"] else "local")
    host = f" host={r['hostname']}({r['hostname_source']})" if r["hostname"] else ""
    verdicts = " ".join(f"{p}={o}" for p, o in r["verdicts"].items() if o != "not_applicable")
    return (f"{r['first_seen'] or '-'} {r['proto']} {r['src']}:{r['sport']} -> {r['dst']}:{r['dport']} "
            f"{r['direction'] or 'not-egress'}\n    country={where}{host} opened_by={r['opened_by'] or '-'} "
            f"sent={r['packets_sent']}/{r['bytes_sent']}B received={r['packets_received']}/{r['bytes_received']}B"
            + (f"\n    {verdicts}" if verdicts else ""))


def flow_row(flow, j: Judged | None) -> dict:
    """One entry of the report's `flows` list (`audit --flows`): field names as in `violations`,
    plus `dport` (the name the flow log uses), the connection's opener and TCP flags, and the
    verdict of each policy. `packets`/`bytes` are what the opener (`src`) sent."""
    loc = j.location if j is not None else None
    return {"proto": proto_name(flow.proto), "src": flow.src, "sport": flow.sport, "dst": flow.dst,
            "dport": flow.dport, "dst_port": flow.dport, "packets": flow.packets, "bytes": flow.bytes,
            **local_counts(flow, j is not None and j.inbound), "opened_by": flow.opened_by,
            "tcp_flags": flag_letters(flow.tcp_flags) if flow.proto == 6 and flow.opened_by else None,
            "tcp_flags_reply": flag_letters(flow.tcp_flags_reply) if flow.proto == 6 and flow.opened_by else None,
            "first_seen": iso_time(flow.first_seen) if flow.first_seen else None,
            "last_seen": iso_time(flow.last_seen) if flow.last_seen else None,
            "egress": j is not None and not j.inbound, "direction": ("inbound" if j.inbound else "outbound") if j
            else None, "country": loc.country if loc is not None and loc.unknown_reason is None else None,
            "hostname": flow.hostname, "hostname_source": flow.hostname_source,
            "recipient": j.recipient.id if j is not None and j.recipient is not None else None,
            "verdicts": {v.policy: v.outcome.value for v in j.outcomes} if j is not None else {}}


def sorted_rows(dict_rows: list, tables: list, chunk: int = 20_000):
    """The `flows` list in its sorted order, `chunk` rows at a time: `dict_rows` (flows added one
    by one, `flow_row` each) and the rows of bulk `tables` ((FlowTable, TableJudgement) pairs),
    made from their columns and group judgements, so a million flows never stand as a million
    dicts at once. Sorted by (first seen or "", src, sport, dst, dport, proto), ties in the order
    the flows came (the dict rows first, then each table's rows in row order)."""
    from agent.flow import iso_parts
    from agent.sinks.records import iso_texts

    order = None if dict_rows else _table_order(tables)
    if order is not None:  # tables only: sorted with numpy, the rows never stand as sort tuples
        which, where = order
        for c in range(0, len(which), chunk):
            yield _rows_at(list(zip(which[c:c + chunk].tolist(), where[c:c + chunk].tolist(), strict=True)),
                           dict_rows, tables)
        return
    keys = [(r["first_seen"] or "", r["src"], r["sport"], r["dst"], r["dport"], r["proto"], -1, k)
            for k, r in enumerate(dict_rows)]
    for b, (t, _res) in enumerate(tables):
        first = t.first.tolist()
        texts = iso_texts(t.first, iso_parts(t.first))
        names = {p: proto_name(p) for p in set(t.proto.tolist())}
        src, dst = t.src, t.dst
        keys += [(texts[i] if first[i] else "", src.text[si], sp, dst.text[di], dp, names[p], b, i)
                 for i, (si, sp, di, dp, p) in enumerate(zip(src.inverse.tolist(), t.sport.tolist(),
                                                              dst.inverse.tolist(), t.dport.tolist(),
                                                              t.proto.tolist(), strict=True))]
    keys.sort()
    for c in range(0, len(keys), chunk):
        yield _rows_at([key[-2:] for key in keys[c:c + chunk]], dict_rows, tables)


def _rows_at(places: list[tuple[int, int]], dict_rows: list, tables: list) -> list[dict]:
    """The rows at these (table, row) places, in order (table -1: `dict_rows[row]`), each table's
    made together by `table_rows`."""
    out: list = [None] * len(places)
    by_table: dict[int, tuple[list, list]] = {}
    for pos, (b, k) in enumerate(places):
        if b < 0:
            out[pos] = dict_rows[k]
        else:
            at, rows = by_table.setdefault(b, ([], []))
            at.append(pos)
            rows.append(k)
    for b, (at, rows) in by_table.items():
        for pos, row in zip(at, table_rows(*tables[b], rows), strict=True):
            out[pos] = row
    return out


def _table_order(tables: list):
    """`sorted_rows`' order of the tables' rows as two arrays (table, row), sorted on numbers: first
    seen as its text sorts (none first; then whole seconds; a second's texts with a fraction before
    the one without, "…:40.5Z" < "…:40Z"; then microseconds), each run of equal first_seen then by
    the rest of the key as text. None where a time is not finite or outside the years 1-9999 (the
    caller sorts the texts)."""
    import numpy as np

    from agent.flow import iso_parts

    if not tables:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first = np.concatenate([t.first for t, _res in tables])
    if not np.isfinite(first).all():
        return None
    whole, us = iso_parts(first)
    if len(whole) and (whole.min() < -62135596800 or whole.max() > 253402300799):
        return None
    some = first != 0
    whole, us = np.where(some, whole, 0), np.where(some, us, 0)
    plain = some & (us == 0)
    order = np.lexsort((us, plain, whole, some))
    which = np.concatenate([np.full(len(t), b, dtype=np.int64) for b, (t, _res) in enumerate(tables)])[order]
    rows = np.concatenate([np.arange(len(t), dtype=np.int64) for t, _res in tables])[order]
    if len(order) < 2:
        return which, rows
    cols = (some[order], whole[order], plain[order], us[order])
    same = np.logical_and.reduce([c[1:] == c[:-1] for c in cols])
    if not same.any():
        return which, rows
    names = [{p: proto_name(p) for p in set(t.proto.tolist())} for t, _res in tables]

    def rest(br: tuple[int, int]) -> tuple:
        b, i = br
        t = tables[b][0]
        return (t.src.text[t.src.inverse[i]], int(t.sport[i]), t.dst.text[t.dst.inverse[i]], int(t.dport[i]),
                names[b][int(t.proto[i])], b, i)

    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
    for start, end in zip(edges[::2].tolist(), (edges[1::2] + 1).tolist(), strict=True):
        run = sorted(zip(which[start:end].tolist(), rows[start:end].tolist(), strict=True), key=rest)
        which[start:end], rows[start:end] = [b for b, _i in run], [i for _b, i in run]
    return which, rows


def table_rows(t, res, rows: list[int]) -> list[dict]:
    """`flow_row` of these rows of a bulk table, each with its judgement (`res`) as the per-row
    path makes it, from the table's columns (no Flow or Judged per row)."""
    import numpy as np

    from agent.flow import OPENED_BY, iso_parts
    from agent.sinks.records import iso_texts

    ix = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    proto = t.proto[ix].tolist()
    names = {p: proto_name(p) for p in set(proto)}
    src = [t.src.text[k] for k in t.src.inverse[ix].tolist()]
    dst = [t.dst.text[k] for k in t.dst.inverse[ix].tolist()]
    col = lambda c: [None] * n if c is None else c[ix].tolist()  # noqa: E731
    sport, dport, pk, by = col(t.sport), col(t.dport), col(t.packets), col(t.bytes)
    opened = [OPENED_BY[o] for o in t.opened[ix].tolist()] if t.opened is not None else [None] * n
    zero = [0] * n
    pkr, byr = (col(t.packets_reply), col(t.bytes_reply)) if t.opened is not None else (zero, zero)
    hints, hints_r = (col(t.hints) if t.hints is not None else zero), \
        (col(t.hints_reply) if t.hints_reply is not None else zero)
    firsts, lasts = t.first[ix], t.last[ix]
    fs = iso_texts(firsts, iso_parts(firsts))
    ls = iso_texts(lasts, iso_parts(lasts))
    fz, lz = (firsts != 0).tolist(), (lasts != 0).tolist()
    host, hsrc = col(t.hostname), col(t.hostname_source)
    direction, keys = res.direction[ix].tolist(), res.key[ix].tolist()
    per_group: dict[int, tuple] = {}
    out = []
    for k in range(n):
        ob = opened[k]
        p, q, b_, r_ = pk[k], by[k], (pkr[k] if ob is not None else 0), (byr[k] if ob is not None else 0)
        j = res.scalar.get(rows[k]) if direction[k] else None
        if j is not None:
            facts = (j.inbound, j.location, j.recipient, {v.policy: v.outcome.value for v in j.outcomes})
        elif direction[k]:
            facts = per_group.get(keys[k])
            if facts is None:
                g = res.reps[keys[k]]
                facts = per_group[keys[k]] = (False, g.location, g.recipient,
                                              {v.policy: v.outcome.value for v in g.outcomes})
        else:
            facts = None
        inbound = facts is not None and facts[0]
        loc = facts[1] if facts is not None else None
        flags = proto[k] == 6 and ob is not None
        out.append({"proto": names[proto[k]], "src": src[k], "sport": sport[k], "dst": dst[k], "dport": dport[k],
                    "dst_port": dport[k], "packets": p, "bytes": q,
                    "packets_sent": b_ if inbound else p, "bytes_sent": r_ if inbound else q,
                    "packets_received": p if inbound else b_, "bytes_received": q if inbound else r_,
                    "opened_by": ob, "tcp_flags": flag_letters(hints[k] & 0xFF) if flags else None,
                    "tcp_flags_reply": flag_letters(hints_r[k] & 0xFF) if flags else None,
                    "first_seen": fs[k] if fz[k] else None, "last_seen": ls[k] if lz[k] else None,
                    "egress": facts is not None and not inbound,
                    "direction": ("inbound" if inbound else "outbound") if facts is not None else None,
                    "country": loc.country if loc is not None and loc.unknown_reason is None else None,
                    "hostname": host[k], "hostname_source": hsrc[k],
                    "recipient": facts[2].id if facts is not None and facts[2] is not None else None,
                    "verdicts": dict(facts[3]) if facts is not None else {}})
    return out
