"""Judging a FlowTable in bulk: the audit's path for flow-heavy inputs.

Contract: `judge_table(pipe, table)` gives, for every row, the same verdicts `pipe.judge` gives for
that row's flow (tests compare whole audit reports made both ways). It does not judge anything
itself: rows are grouped by the facts the verdict cache keys on (`Pipeline._key`: the location's
fields, which policy networks hold the destination and the source, day, protocol, and the port,
process and host name where policies select on them), and `pipe.judge` is called once per group,
on its first row. The facts are found in bulk: scope and policy networks by `searchsorted` over the
same interval tables the scalar path bisects, the location by one database lookup per network the
destinations fall in (`Locator.locate_many`), and with a recipient register, the recipient (once
per destination and host name). Rows the bulk form does not cover go through `pipe.judge` one by
one: inbound connections, and flows without a plausible time (judged at the as-of date).

Why: per flow, `pipe.judge` costs ~25 us of Python; a capture with 200,000 flows then spends
seconds judging what a few hundred groups decide.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np

from agent.flowtable import FlowTable, group_rows
from agent.judge.pipeline import PLAUSIBLE_FROM, Judged, Pipeline
from agent.policy.compiled import location_class

OUTBOUND, INBOUND = 1, 2
_EPOCH = date(1970, 1, 1)


class TableJudgement:
    """Per row: `direction` (0 not judged, OUTBOUND, INBOUND) and `key` (index into `reps`, the
    judgement of the group's first row; -1 for rows in `scalar`, judged one by one)."""

    def __init__(self, n: int):
        self.direction = np.zeros(n, dtype=np.int8)
        self.key = np.full(n, -1, dtype=np.int64)
        self.reps: list[Judged] = []
        self.rep_rows: list[int] = []
        self.scalar: dict[int, Judged] = {}


def _recipients(pipe: Pipeline, t: FlowTable, rows, di, used_locs: list, used, ints: list) -> np.ndarray:
    """Per row, an id of the register's recipient the flow goes to, found as `Pipeline.judge` finds
    it (name, then the destination's ASN, then its networks), once per (destination, host name)."""
    import ipaddress

    asn = dict(zip(used.tolist(), (loc.asn for loc in used_locs), strict=True))
    hosts = t.hostname[rows].tolist() if t.hostname is not None else [None] * len(rows)
    v4 = t.dst.v4.tolist()
    found: dict[tuple, int] = {}
    ids: dict = {}
    out = np.empty(len(rows), dtype=np.int64)
    for i, (d, h) in enumerate(zip(di.tolist(), hosts, strict=True)):
        k = found.get((d, h))
        if k is None:  # the address object from its integer: ~5x cheaper than parsing its text
            address = ipaddress.IPv4Address(ints[d]) if v4[d] else ipaddress.IPv6Address(ints[d])
            rec, how = pipe.register.match_how(h, asn[d], address)
            # how it matched is part of the key: a match by name alone is checked against the
            # recipient's declared locations (`Pipeline._name_claim`)
            k = found[(d, h)] = ids.setdefault((rec.id, how == "hostname") if rec is not None else None, len(ids))
        out[i] = k
    return out


def judge_table(pipe: Pipeline, t: FlowTable) -> TableJudgement:
    n = len(t)
    res = TableJudgement(n)
    if n == 0:
        return res
    src, dst = t.src, t.dst
    s_pub = (np.array(pipe.scoper.scope_many(src.v4, src.hi, src.lo), dtype=object) == "public")[src.inverse]
    d_pub = (np.array(pipe.scoper.scope_many(dst.v4, dst.hi, dst.lo), dtype=object) == "public")[dst.inverse]
    out = d_pub & ~s_pub
    inb = (s_pub & ~d_pub) if pipe.inbound else np.zeros(n, dtype=bool)
    res.direction[out] = OUTBOUND
    res.direction[inb] = INBOUND
    # The judging day, as Pipeline.judging_day: rows without a plausible time go one by one.
    as_of = pipe.as_of or datetime.now(UTC).date()
    day = np.floor(t.first / 86400).astype(np.int64)
    plausible = (t.first != 0) & (t.first >= PLAUSIBLE_FROM) & (day - (as_of - _EPOCH).days <= 1)
    one_by_one = inb | (out & ~plausible)
    for i in np.flatnonzero(one_by_one).tolist():
        res.scalar[i] = pipe.judge(t.flow(i), inbound=bool(inb[i]))
    rows = np.flatnonzero(out & ~one_by_one)
    if not len(rows):
        return res
    # the destinations in use, in address order: a presence count, O(n) (np.unique sorts every row)
    used = np.flatnonzero(np.bincount(dst.inverse[rows], minlength=len(dst)))
    ints = dst.ints()
    text = dst.text
    cls, locs = pipe.locator.locate_many([ints[i] for i in used.tolist()], dst.v4[used].tolist(),
                                         [text[i] for i in used.tolist()])
    # Locations that differ only in the address are one class for the verdict.
    class_ids: dict = {}
    loc_class = np.array([class_ids.setdefault(location_class(loc), len(class_ids)) for loc in locs],
                         dtype=np.int64)
    dst_class = np.full(len(dst), -1, dtype=np.int64)
    dst_class[used] = loc_class[np.asarray(cls, dtype=np.int64)]
    di, si = dst.inverse[rows], src.inverse[rows]
    cols = [dst_class[di], pipe._dst_nets.ids_many(dst.v4, dst.hi, dst.lo)[di],
            pipe._src_nets.ids_many(src.v4, src.hi, src.lo)[si], day[rows], t.proto[rows]]
    if pipe._by_port:
        cols.append(t.dport[rows])
    if pipe._by_who and t.who is not None:
        cols.append(t.who[rows])
    if pipe._by_host and t.hostname is not None:
        cols.append(t.hostname[rows])
        if t.hostname_source is not None:  # whether a name may excuse depends on its source
            cols.append(t.hostname_source[rows])
    if pipe.register is not None:
        cols.append(_recipients(pipe, t, rows, di, [locs[c] for c in cls], used, ints))
    group, first = group_rows(cols)
    res.key[rows] = group
    for r in rows[first].tolist():
        res.reps.append(pipe.judge(t.flow(r)))
        res.rep_rows.append(r)
    return res


def judged_rows(t: FlowTable, res: TableJudgement, direction: int = OUTBOUND):
    """(row, Judged) for every row judged in `direction`, in row order, for consumers that need one
    per flow (inventories): rows judged one by one as they were judged, the others from their
    group's judgement with the row's own flow. Their `location` is the group's Location, whose `ip`
    is the group's first destination; the flow names its own (no consumer reads `location.ip`)."""
    for i in np.flatnonzero(res.direction == direction).tolist():
        yield i, judged_row(t, res, i)


def judged_row(t: FlowTable, res: TableJudgement, i: int) -> Judged:
    """Row i's Judged (see `judged_rows`)."""
    j = res.scalar.get(i)
    if j is None:
        rep = res.reps[int(res.key[i])]
        j = Judged(t.flow(i), rep.location, rep.outcomes, rep.jurisdictions, rep._for, rep.judged_at,
                   recipient=rep.recipient)
    return j
