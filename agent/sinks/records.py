"""The audit report's verdict records (violations, indeterminate, exempt) as the bulk path makes them:
columns, not a dict per record.

Contract: `RecordBlock(per_group, cols, loc)` holds the records of one kind from one judged table:
record k is (row i, verdict v) for each row in row order and each verdict of that kind of the row's
group. `dicts()` gives them as the report's record dicts (the reference form: what `AuditReport.add`
builds per flow); `json()` gives each record's JSON text, byte for byte what `orjson.dumps` makes of
its dict. `sort_order(records)` orders a list of dicts and blocks as `sorted(dicts, key=(policy,
first_seen, dst, dst_port))` would, stably.

Why: an audit of a flow-heavy capture reports ~80,000 violations. A 24-key dict per record, then
orjson walking it, then a Python sort on a key tuple per record cost ~0.6 s of a ~2.5 s audit; one
f-string per record from per-group constants and a numpy lexsort cost about a third of that.
"""

from __future__ import annotations

import orjson

from agent.flow import iso_time
from agent.judge.pipeline import rewrite_message

try:  # the C writers of `RecordBlock.json` and `iso_texts` (optional: Python makes the same text)
    from agent.sinks._records import iso_texts as _c_iso_texts
    from agent.sinks._records import json as _c_json
except ImportError:
    _c_json = _c_iso_texts = None
from agent.policy.engine import PEER_NOUN

# Columns of a block, one entry per row (in this order): group, src, sport, dst, dport, proto name,
# packets, bytes, first_seen, last_seen, process (dict or None), hostname, hostname_source,
# description prefix (`peer_prefix`), packets and bytes received (the connection's reply
# direction), opened_by. Rows are outbound connections: what was sent is `packets`/`bytes`.
COLUMNS = ("group", "src", "sport", "dst", "dport", "proto", "packets", "bytes", "first_seen", "last_seen",
           "process", "hostname", "hostname_source", "prefix", "packets_received", "bytes_received", "opened_by")


def _js(s) -> str:
    """JSON text of a value, as orjson writes it. A printable string without a quote or a backslash
    is written as it is (orjson escapes only those and control characters), without a C call."""
    if s is None:
        return "null"
    if type(s) is str and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return orjson.dumps(s).decode()


def _message_form(message: str, written_for: tuple[str, str]) -> tuple[int, str]:
    """How `rewrite_message(message, written_for, peer, prefix, False)` depends on the row: (0, rest)
    = prefix + rest, (1, rest) = "destination PEER " + rest, (2, message) = message as it is."""
    old_peer, old_prefix = written_for
    if message.startswith(old_prefix):
        return 0, message[len(old_prefix):]
    old = f"{PEER_NOUN[False]} {old_peer} "
    if message.startswith(old):
        return 1, message[len(old):]
    return 2, message


def _quoted(col: list) -> list[str]:
    """JSON texts of a column of strings and Nones. One check over the whole column finds the
    common case (all printable, no quote or backslash), which needs no per-value call. A column of
    few distinct values (sources) gets one text per value, shared by its rows (~60 MB less per
    million rows than a text each)."""
    head = col[:4096]
    if 2 * len(set(head)) >= len(head) > 64:  # many distinct values (destinations): a text each,
        return _quoted_each(col)  # without hashing a million strings to find that out
    distinct = dict.fromkeys(col)
    if len(distinct) == 1:  # one value (no names: every hostname None): one text, no lookup per row
        return _quoted_each(list(distinct)) * len(col)
    if 2 * len(distinct) < len(col):
        texts = dict(zip(distinct, _quoted_each(list(distinct)), strict=True))
        return [texts[x] for x in col]
    return _quoted_each(col)


def _plain(col: list) -> bool:
    """Whether every value is a str whose JSON text is itself between quotes (printable, no quote or
    backslash): what `_quoted_each` checks, for a writer that adds the quotes itself."""
    try:
        joined = "".join(col)
    except TypeError:
        return False
    return joined.isprintable() and '"' not in joined and "\\" not in joined


def _quoted_each(col: list) -> list[str]:
    nulls = col.count(None)
    if nulls == len(col):
        return ["null"] * len(col)
    if not nulls and _plain(col):
        # each value between quotes: one join and one split (no NUL in printable text), ~4x
        # faster than a quoted f-string per value
        return ('"' + '"\0"'.join(col) + '"').split("\0")
    return [_js(x) for x in col]


def iso_texts(ts, parts=None) -> list[str]:
    """`agent.flow.iso_times` of a column (parts: its `iso_parts`, when made already), in C where
    built (~10x faster; tests hold both equal)."""
    import numpy as np

    from agent.flow import iso_parts, iso_times

    if _c_iso_texts is not None:
        whole, us = iso_parts(ts) if parts is None else parts
        try:
            return _c_iso_texts(np.ascontiguousarray(whole, dtype=np.int64), np.ascontiguousarray(us, dtype=np.int64))
        except ValueError:  # a time outside the years 1970-9999: numpy's formatter spells it
            pass
    return iso_times(ts, parts)


_C_MAX_TS = 253402300798  # the last second the C writer formats (MAX_TS in sinks/_isotime.h)


class IsoColumn:
    """A time column of report records (first_seen, last_seen): `iso_texts` of its times, made when
    asked, one (`col[i]`) or many (`texts`); the C writer formats them from `parts` itself. A
    million rows held as texts cost ~75 MB per column; as numbers, 24 MB."""

    __slots__ = ("ts", "parts")

    def __init__(self, ts, parts):
        self.ts, self.parts = ts, parts  # float seconds; their `iso_parts` (int64 arrays)

    def __len__(self) -> int:
        return len(self.ts)

    def __getitem__(self, i: int) -> str:
        return iso_time(float(self.ts[i]))

    def texts(self, rows) -> list[str]:
        return iso_texts(self.ts[rows], (self.parts[0][rows], self.parts[1][rows]))

    @classmethod
    def of(cls, ts, parts=None):
        """The column of these times; their texts (a list) where one is outside what the C writer
        formats (before 1970 or after 9999), so every consumer reads the same texts."""
        from agent.flow import iso_parts

        parts = iso_parts(ts) if parts is None else parts
        whole = parts[0]
        if _c_iso_texts is None or len(whole) and (whole.min() < 0 or whole.max() > _C_MAX_TS):
            return iso_texts(ts, parts)
        return cls(ts, parts)


def _time_col(col):
    """A time column as the C writer takes it: its texts, or an IsoColumn's (whole, us)."""
    return col.parts if type(col) is IsoColumn else col


class _Prefixes:
    """The description prefix of each row without a host name, made when asked (`peer_prefix`)."""

    __slots__ = ("dst",)

    def __init__(self, dst):
        self.dst = dst

    def __getitem__(self, i):
        return f"{PEER_NOUN[False]} {self.dst[i]} ("


class RecordBlock:
    __slots__ = ("per_group", "cols", "loc", "first_key", "_pairs", "_parts", "_proto_j")

    def __init__(self, per_group: list[list[tuple]], cols: tuple[list, ...], loc: list[tuple], first_key=None):
        """`per_group[g]`: the (verdict, written_for) pairs of this kind for group g; `cols`: the
        COLUMNS; `loc[g]`: (country, registered_country, asn, as_org, recipient id) of group g;
        `first_key`: `iso_parts` of the rows' first_seen (int arrays), which sort as its text does."""
        self.per_group, self.cols, self.loc, self.first_key = per_group, cols, loc, first_key
        self._pairs: list[tuple[int, int, tuple]] | None = None
        self._parts: tuple | None = None
        self._proto_j: list[str] | None = None

    def pairs(self) -> list[tuple[int, int, tuple]]:
        """(row, group, (verdict, written_for)) of each record, in record order."""
        if self._pairs is None:
            pg = self.per_group
            self._pairs = [(i, g, e) for i, g in enumerate(self.cols[0]) for e in pg[g]]
        return self._pairs

    def __len__(self) -> int:
        return len(self.pairs())

    def dicts(self) -> list[dict]:
        _, src, sport, dst, dport, proto, pk, by, fs, ls, pr, host, hsrc, pre, pkr, byr, ob = self.cols
        pre = pre if pre is not None else _Prefixes(dst)
        loc = self.loc
        return [{"policy": v.policy, "severity": v.severity, "reason": v.reason,
                 "message": rewrite_message(v.message, wf, dst[i], pre[i], False),
                 "exception": v.exception, "src": src[i], "sport": sport[i], "dst": dst[i], "dst_port": dport[i],
                 "dport": dport[i],
                 "proto": proto[i], "direction": "outbound", "country": loc[g][0], "registered_country": loc[g][1],
                 "asn": loc[g][2], "as_org": loc[g][3], "packets": pk[i], "bytes": by[i], "packets_sent": pk[i],
                 "bytes_sent": by[i], "packets_received": pkr[i], "bytes_received": byr[i], "opened_by": ob[i],
                 "first_seen": fs[i],
                 "last_seen": ls[i], "process": pr[i], "hostname": host[i], "hostname_source": hsrc[i],
                 "recipient": loc[g][4]}
                for i, g, (v, wf) in self.pairs()]

    def json(self, select=None, as_bytes: bool = False, joined: bool = False):
        """Each record's JSON text (compact, keys in the dict's order); with `select`, only the
        records at those positions (in record order), so a large report is written a slice at a
        time rather than held whole. `as_bytes`: UTF-8 bytes instead of str; `joined`: one bytes,
        the records joined by commas."""
        _, src, sport, dst, dport, proto, pk, by, fs, ls, pr, host, hsrc, pre, pkr, byr, ob = self.cols
        prep = self._prep()
        forms, src_j, dst_j, host_j, hsrc_j, pre_j, ob_j, noun_j, proto_j, pr_j, dst_raw = prep
        pairs = self.pairs()
        if _c_json is not None:
            try:
                return _c_json(select if select is None or type(select) is list else list(select), pairs, forms,
                               (src_j, sport, dst_j, dport, self._proto_col(proto_j, proto), pk, by, pkr, byr, ob_j,
                                _time_col(fs), _time_col(ls), pr_j, host_j, hsrc_j, pre_j), noun_j, as_bytes or joined,
                               joined, dst_raw)
            except (TypeError, ValueError):  # a value the C writer does not take (a count beyond 64 bits)
                pass
        if dst_raw:
            dst_j = _quoted_each(dst_j)
        out = []
        for i, _g, e in (pairs if select is None else (pairs[k] for k in select)):
            head, mode, rest, mid, where, tail = forms[id(e)]
            if mode == 0:
                msg = pre_j[i][1:-1] + rest
            elif mode == 1:
                msg = f"{noun_j}{dst_j[i][1:-1]} {rest}"
            else:
                msg = rest
            out.append(f'{head}{msg}{mid}{src_j[i]},"sport":{sport[i]},"dst":{dst_j[i]},"dst_port":{dport[i]},'
                       f'"dport":{dport[i]},'
                       f'"proto":{proto_j[proto[i]]},{where}"packets":{pk[i]},"bytes":{by[i]},"packets_sent":{pk[i]},'
                       f'"bytes_sent":{by[i]},"packets_received":{pkr[i]},"bytes_received":{byr[i]},'
                       f'"opened_by":{ob_j[i]},'
                       f'"first_seen":"{fs[i]}","last_seen":"{ls[i]}","process":{pr_j[i]},'
                       f'"hostname":{host_j[i]},"hostname_source":{hsrc_j[i]},{tail}')
        if joined:
            return ",".join(out).encode()
        return [t.encode() for t in out] if as_bytes else out

    def _proto_col(self, proto_j: dict, proto: list) -> list[str]:
        """Each row's protocol as JSON text (for the C writer), made once per block."""
        got = self._proto_j
        if got is None:
            got = self._proto_j = [proto_j[p] for p in proto]
        return got

    def _prep(self) -> tuple:
        """The per-group and per-row JSON parts every record is made of (made once per block)."""
        if self._parts is not None:
            return self._parts
        _, src, sport, dst, dport, proto, pk, by, fs, ls, pr, host, hsrc, pre, pkr, byr, ob = self.cols
        # per (group, verdict): the text before the message, how the message is made, the text
        # from the message's end to src, and the location part, each escaped once
        forms: dict = {}
        for g, pg in enumerate(self.per_group):
            c, rc, asn, org, rcp = self.loc[g]
            for e in pg:
                v, wf = e
                mode, rest = _message_form(v.message, wf)
                forms[id(e)] = (f'{{"policy":{_js(v.policy)},"severity":{_js(v.severity)},'
                                f'"reason":{_js(v.reason)},"message":"', mode, _js(rest)[1:-1],
                                f'","exception":{orjson.dumps(v.exception).decode()},"src":',
                                f'"direction":"outbound","country":{_js(c)},"registered_country":{_js(rc)},'
                                f'"asn":{orjson.dumps(asn).decode()},"as_org":{_js(org)},',
                                f'"recipient":{_js(rcp)}}}')
        src_j, host_j, hsrc_j = _quoted(src), _quoted(host), _quoted(hsrc)
        # destinations: plain text (no quote, backslash or control character) as they are, quoted by
        # the writer (a million quoted copies of a million distinct addresses cost ~0.4 s and 60 MB)
        dst_raw = _plain(dst)
        dst_j = dst if dst_raw else _quoted(dst)
        if pre is None:  # no names: messages spell "destination ADDR (" from dst (mode 1); rarely mode 0
            pre_j = _quoted([f"{PEER_NOUN[False]} {d} (" for d in dst]) \
                if any(f[1] == 0 for f in forms.values()) else [""] * len(dst)
        else:
            pre_j = _quoted(pre)
        ob_j = _quoted(ob)
        noun_j = _js(f"{PEER_NOUN[False]} ")[1:-1]
        proto_j = {p: _js(p) for p in set(proto)}
        pr_j = ["null"] * len(pr) if pr.count(None) == len(pr) else \
            ["null" if p is None else orjson.dumps(p).decode() for p in pr]
        self._parts = (forms, src_j, dst_j, host_j, hsrc_j, pre_j, ob_j, noun_j, proto_j, pr_j, dst_raw)
        return self._parts

    def sort_keys(self):
        """Numeric sort keys of the records (int arrays: policy name's rank among `names`, seconds,
        no-fraction flag, microseconds) and the row of each record, or None without `first_key`."""
        import numpy as np

        if self.first_key is None:
            return None
        p = self.pairs()
        rows = np.fromiter((i for i, _, _ in p), dtype=np.int64, count=len(p))
        whole, us = self.first_key
        return [e[0].policy for _, _, e in p], whole[rows], (us[rows] == 0).astype(np.int64), us[rows]

    def tie_keys(self) -> list[tuple[str, int]]:
        """(dst, dst_port) of each record: what orders records with equal policy and first_seen."""
        dst, dport = self.cols[3], self.cols[4]
        return [(dst[i], dport[i]) for i, _, _ in self.pairs()]


def sort_order(records: list) -> list[int] | None:
    """The stable order of the records (RecordBlocks, expanded) by (policy, first_seen, dst,
    dst_port), as indexes into the expanded list; None when a record is a dict or a block without
    numeric time keys (the caller sorts the dicts itself).

    Sorts on numbers (policy rank, then first_seen as `iso_parts`) with numpy, then puts each run of
    records with equal policy and first_seen in (dst, dst_port) order: rare in real traffic, where
    flows seldom start in the same microsecond, and exact whatever their number."""
    import numpy as np

    parts = []
    for r in records:
        k = r.sort_keys() if isinstance(r, RecordBlock) else None
        if k is None:
            return None
        parts.append(k)
    if not parts:
        return []
    names = [n for k in parts for n in k[0]]
    if not all(type(n) is str for n in names):
        return None
    rank = {n: i for i, n in enumerate(sorted(set(names)))}
    pol = np.fromiter(map(rank.__getitem__, names), dtype=np.int64, count=len(names))
    whole, zero, us = (np.concatenate([k[j] for k in parts]) for j in (1, 2, 3))
    order = np.lexsort((us, zero, whole, pol))
    if len(order) < 2:
        return order.tolist()
    cols = (pol[order], whole[order], zero[order], us[order])
    same = np.logical_and.reduce([c[1:] == c[:-1] for c in cols])
    if not same.any():
        return order.tolist()
    ties = [t for r in records for t in r.tie_keys()]
    if not all(type(d) is str and type(p) is int for d, p in ties):
        return None
    order = order.tolist()
    # runs of equal (policy, first_seen): [start, end) in sorted positions
    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
    for start, end in zip(edges[::2].tolist(), (edges[1::2] + 1).tolist(), strict=True):
        order[start:end] = sorted(order[start:end], key=ties.__getitem__)
    return order
