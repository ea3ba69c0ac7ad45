"""JSON-lines flow logs read in bulk into a FlowTable: the common file, without a Python object per flow.

Contract: `read_jsonl_table(path)` gives (FlowTable, JsonlStats) equal, row for row, to
`read_jsonl(path)` (tests compare them on random logs), or None when the file is not the plain
case; the caller then reads it with `read_jsonl`, which also gives every error its file:line and
field. The plain case: every line a flow object as `Flow.to_json` writes it (no evidence records,
`process`, `conntrack_id` or gap markers, which need merging or per-line checks), the file ends with
a newline, no line is over MAX_LINE, times are RFC 3339 UTC with "Z" and no or six fraction digits,
or POSIX seconds. Any line outside it sends the whole file to `read_jsonl`: its acceptance and
messages stay the one definition.

Why: per line, `read_jsonl` runs a dozen small checks and builds a Flow (~20 us); here each column is
checked at once (types with one pass, times with numpy's datetime parser, addresses once per
distinct value), so a replay of 200,000 flows spends its time judging, not parsing.
"""

from __future__ import annotations

import gc
import os
from socket import AF_INET as _AF4
from socket import AF_INET6 as _AF6
from socket import inet_ntop as _ntop
from socket import inet_pton as _pton

import numpy as np

from agent.enrich.scope import ip_int
from agent.flow import OPENED_CODE, PROTO_NUMBERS, TCP_FLAG_LETTERS
from agent.flowtable import FlowTable, addr_text, concat, group_rows, object_column
from agent.names.hostnames import canonical
from agent.sources.flowlog.jsonl import (
    CONNECTION_KEYS,
    MAX_INT_DIGITS,
    MAX_LINE,
    MAX_TIME,
    JsonlStats,
    canonical_ip,
    gap_warning,
)

try:
    from agent.sources.flowlog._flowlog import columns as _c_columns
except ImportError:  # the C module is optional
    _c_columns = None

MAX_BULK_BYTES = 1 << 28  # bigger logs are read line by line
CHUNK_LINES = 1 << 16  # lines parsed at a time: only one chunk's dicts are alive
_SPECIAL = ("flow", "event", "conntrack_id", "process")
_PROTO = {**PROTO_NUMBERS, **{k.upper(): v for k, v in PROTO_NUMBERS.items()}}
_M64 = (1 << 64) - 1
_ZERO10 = bytes(10)
_U16_MAX, _I64_MAX = 65535, 2**63 - 1


class _NotPlain(Exception):
    """This file needs the line-by-line reader."""


def _ints(col: list, default: int, hi: int) -> list[int]:
    """A column of integers in 0..hi (None: the default), as `jsonl._int` accepts them (no bools)."""
    out = [default if v is None else v for v in col] if None in col else col
    if set(map(type, out)) != {int} or min(out) < 0 or max(out) > hi:
        raise _NotPlain
    return out


def _times(col: list, default) -> np.ndarray:
    """POSIX seconds of RFC 3339 "...Z" strings and numbers, as `jsonl._time` gives them."""
    out = np.empty(len(col), dtype=np.float64)
    if set(map(type, col)) == {str}:  # the usual log: every time as text
        strs, nums, none = slice(None), [], []
        col_s = col
    else:
        strs = [i for i, v in enumerate(col) if type(v) is str]
        nums = [i for i, v in enumerate(col) if type(v) in (int, float)]
        none = [i for i, v in enumerate(col) if v is None]
        if len(strs) + len(nums) + len(none) != len(col):
            raise _NotPlain
        col_s = [col[i] for i in strs]
    if col_s:
        text = np.array(col_s, dtype="U28")  # one more than the longest form: longer text is not cut to fit
        lengths = np.char.str_len(text)
        if not np.isin(lengths, (20, 27)).all():
            raise _NotPlain
        c = text.view(np.uint32).reshape(len(col_s), 28)
        digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
        ok = ((c[:, digits] >= 48) & (c[:, digits] <= 57)).all(axis=1)
        for pos, ch in ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":")):
            ok &= c[:, pos] == ord(ch)
        short = lengths == 20
        ok &= np.where(short, c[:, 19] == ord("Z"), (c[:, 19] == ord(".")) & (c[:, 26] == ord("Z")) &
                       ((c[:, 20:26] >= 48) & (c[:, 20:26] <= 57)).all(axis=1))
        if not ok.all():
            raise _NotPlain
        try:
            us = np.array([v[:-1] for v in col_s], dtype="datetime64[us]").astype(np.int64)
        except ValueError:  # an impossible date: the line reader says which line
            raise _NotPlain from None
        if (us < 0).any() or (us >= 1 << 53).any():  # beyond float's exact integers: line by line
            raise _NotPlain
        out[strs] = us / 1e6
    if nums:
        out[nums] = [float(col[i]) for i in nums]
    if none:
        out[none] = default[none] if isinstance(default, np.ndarray) else default
    if ((out < 0) | (out > MAX_TIME)).any():
        raise _NotPlain
    return out


def _names(col: list) -> np.ndarray | None:
    if all(v is None for v in col):
        return None
    memo: dict = {}
    out = []
    for v in col:
        if v is None:
            out.append(None)
            continue
        c = memo.get(v)
        if c is None:
            if type(v) is not str:
                raise _NotPlain
            try:
                c = memo[v] = canonical(v)
            except ValueError:
                raise _NotPlain from None
        out.append(c)
    return object_column(out)


_DIGIT_MAP = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))


def _long_digits(data: bytes) -> bool:
    """`jsonl._LONG_DIGITS.search(data)`, ~20x faster: a run of more than MAX_INT_DIGITS digits."""
    return b"0" * (MAX_INT_DIGITS + 1) in data.translate(_DIGIT_MAP)


def read_jsonl_table(path: str) -> tuple[FlowTable, JsonlStats] | None:
    import orjson

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BULK_BYTES:
                return None
            data = f.read(MAX_BULK_BYTES + 1)
    except OSError:
        return None  # the line reader reports it
    if not data or len(data) > MAX_BULK_BYTES or not data.endswith(b"\n"):
        return None
    if _c_columns is not None:  # refuses numbers longer than 19 digits itself
        try:
            table = _from_columns(_c_columns(data, MAX_LINE))
        except _NotPlain:
            table = None
        if table is not None:
            return table, JsonlStats(path, lines=len(table), flows=len(table), warnings=[])
    if _long_digits(data):
        return None
    lines = data.split(b"\n")
    lines.pop()
    del data
    was_enabled = gc.isenabled()
    gc.disable()  # millions of small dicts: the cyclic collector would walk them again and again
    try:
        if max(map(len, lines)) > MAX_LINE:
            return None
        evidence = None
        parts, ct_ids, warnings = [], [], []
        memo: tuple[dict, dict] = ({}, {})  # addresses parsed once for the whole file
        last_seq: list = [None]  # the evidence log's last seq so far, across chunks
        for start in range(0, len(lines), CHUNK_LINES):  # bounded: one chunk's objects at a time
            objs = list(map(orjson.loads, lines[start:start + CHUNK_LINES]))
            if set(map(type, objs)) != {dict}:
                return None
            kind = "flow" in objs[0] or "event" in objs[0]
            if evidence is not None and kind != evidence:
                return None  # flow objects and evidence records in one file: line by line
            evidence = kind
            if evidence and not _seq_whole(objs, last_seq[0]):
                return None  # a hole in seq: the line reader words the warning
            if evidence:
                last_seq[0] = objs[-1].get("seq", last_seq[0])
                got = _evidence_rows(path, objs, start, warnings, memo)
                if got is not None:
                    parts.append(got[0])
                    ct_ids.append(got[1])
            else:
                parts.append(_table(objs, *memo))
        if not parts:
            return None
        table = concat(parts)
        stats = JsonlStats(path, lines=len(lines), warnings=warnings)
        if evidence:
            table = _merged(table, np.concatenate(ct_ids))
        stats.flows = len(table)
        return table, stats
    except (orjson.JSONDecodeError, _NotPlain, TypeError, ValueError, OverflowError):
        return None
    finally:
        if was_enabled:
            gc.enable()


def _seq_whole(objs: list[dict], last) -> bool:
    """Every record's `seq` one more than the one before (gap records may jump: they say why)."""
    seqs = [o.get("seq") for o in objs]
    if not all(type(s) is int for s in seqs):
        return all(s is None for s in seqs)  # a log without seq (hand-written): nothing to check
    prev = last
    for s, o in zip(seqs, objs, strict=True):
        if prev is not None and s > prev + 1 and o.get("event") != "gap":
            return False
        prev = s if prev is None else max(prev, s)
    return True


def _evidence_rows(path: str, objs: list[dict], start: int, warnings: list,
                   memo: tuple[dict, dict]) -> tuple[FlowTable, np.ndarray] | None:
    """The flows of a chunk of an evidence log (`egress-agent run` writes one record per reported
    verdict, and `end` records), one row per record, with each record's conntrack id (-1: none);
    None when the chunk holds only gap and stop markers (gaps become warnings, as `read_jsonl` words them)."""
    inner = [o.get("flow") for o in objs]
    if None in inner:  # gap and stop markers
        for i in [i for i, x in enumerate(inner) if x is None]:
            o = objs[i]
            if o.get("event") not in ("gap", "stop"):
                raise _NotPlain  # a flow object among evidence records: line by line
            if o["event"] == "gap":
                warnings.append(gap_warning(path, start + i + 1, o))
        objs = [o for o, x in zip(objs, inner, strict=True) if x is not None]
        inner = [x for x in inner if x is not None]
        if not inner:
            return None
    if set(map(type, inner)) != {dict} or not all("event" in o for o in objs):
        raise _NotPlain  # a record without its flow, or a flow without its event
    ct_ids = [o.get("conntrack_id") for o in objs]
    if not set(map(type, ct_ids)) <= {int, type(None)}:
        raise _NotPlain  # the line reader names the field
    given = [c for c in ct_ids if c is not None]
    if given and (min(given) < 0 or max(given) > 0xFFFFFFFF):
        raise _NotPlain
    return _table(inner, *memo), np.array([-1 if c is None else c for c in ct_ids], dtype=np.int64)


def _merged(t: FlowTable, ct: np.ndarray) -> FlowTable:
    """An evidence log's flows merged as `read_jsonl` merges them: one flow per (id, tuple), or per
    (tuple, first seen) for records without an id (the capture source); its row is the record
    with the most bytes (the later one on a tie), its place its first record's."""
    untracked = ct < 0
    first_key = np.where(untracked, t.first, 0.0).view(np.int64)
    group, _ = group_rows([untracked.astype(np.int64), ct, t.proto, t.src.inverse, t.sport, t.dst.inverse, t.dport,
                           first_key])
    order = np.lexsort((np.arange(len(group)), t.bytes, group))
    g = group[order]
    return t.take(order[np.r_[g[1:] != g[:-1], True]])  # the last row of each group in that order


class _Columns:
    """Columns of the objects by key. When every line has as many keys as the first and each of the
    first's keys (one writer's log), the key sets are equal: one `dict[key]` pass per key. Otherwise
    `dict.get` per line. Either way a line with a key that needs the line reader is refused."""

    def __init__(self, objs: list[dict]):
        self.objs = objs
        self.cols = None
        first = list(objs[0])
        if set(map(len, objs)) == {len(first)}:
            try:
                self.cols = {k: [o[k] for o in objs] for k in first}
            except KeyError:
                self.cols = None
        if self.cols is not None:
            if any(k in self.cols for k in _SPECIAL):
                raise _NotPlain  # evidence records, processes, gap markers: line by line
        elif any(k in o for o in objs for k in _SPECIAL):
            raise _NotPlain

    def __call__(self, key: str) -> list:
        if self.cols is not None:
            col = self.cols.get(key)
            return col if col is not None else [None] * len(self.objs)
        return [o.get(key) for o in self.objs]


def _words(v: str) -> tuple[str, tuple[bool, int, int]]:
    """(canonical text, key words) of an address, as the line reader spells it; ValueError if not one.

    One inet_pton per address where its spelling is `canonical_ip`'s (~1 us, against ~3 us through
    `canonical_ip` and `ip_int`, whose memos a log of 100,000 distinct addresses only churns);
    the forms it hands to `ipaddress` (::a.b.c.d, scoped) and every error take that path itself."""
    try:
        if ":" in v:
            packed = _pton(_AF6, v)
            if packed[:10] != _ZERO10:
                n = int.from_bytes(packed, "big")
                return _ntop(_AF6, packed), (False, n >> 64, n & _M64)
        else:
            packed = _pton(_AF4, v)
            return _ntop(_AF4, packed), (True, 0, int.from_bytes(packed, "big"))
    except OSError:
        pass
    c = canonical_ip(v)
    version, n = ip_int(c)
    return c, (version == 4, n >> 64, n & _M64)


def _from_columns(got) -> FlowTable | None:
    """The table `_table` makes of a plain log, from the columns agent.sources.flowlog._flowlog read (None:
    not that case). Strings come once per distinct value and go through the same checks."""
    if got is None:
        return None
    (n, proto, protos, src, dst, addrs, v4, hi, lo, ok, sport, dport, packets, bytes_, first, last,
     source, sources, host, hosts, hsrc, hsrcs) = got
    i32, i64, f64 = (lambda b: np.frombuffer(b, dtype=np.int32)), (lambda b: np.frombuffer(b, dtype=np.int64)), \
        (lambda b: np.frombuffer(b, dtype=np.float64))
    proto = i64(proto)
    if protos:  # names, as `_table` maps them
        codes = [_PROTO.get(p) for p in protos]
        if not all(type(c) is int and 0 <= c < 256 for c in codes):
            raise _NotPlain
        proto = np.where(proto >= 256, np.array(codes + [0], dtype=np.int64)[np.clip(proto - 256, 0, len(codes))],
                         proto)
    a_v4 = np.frombuffer(v4, dtype=np.uint8).astype(bool)
    a_hi, a_lo = np.frombuffer(hi, dtype=np.uint64).copy(), np.frombuffer(lo, dtype=np.uint64).copy()
    names = None
    missing = np.flatnonzero(np.frombuffer(ok, dtype=np.uint8) == 0).tolist()
    if missing:  # spelled by `_words` itself (::a.b.c.d forms, scoped, or not an address: _NotPlain)
        names = {}
        for k in missing:
            try:
                c, w = _words(addrs[k])
            except ValueError:
                raise _NotPlain from None
            a_v4[k], a_hi[k], a_lo[k] = w
            names[w] = c
        # the table spells each address from this memo: give it every address, spelled as `_words` does
        for w in zip(a_v4.tolist(), a_hi.tolist(), a_lo.tolist(), strict=True):
            if w not in names:
                names[w] = addr_text(*w)
    si, di = i32(src), i32(dst)
    first, last = f64(first), f64(last)
    if ((first < 0) | (first > MAX_TIME) | (last < 0) | (last > MAX_TIME)).any():
        raise _NotPlain
    src_names = [s or "jsonl" for s in sources] + ["jsonl"]  # index -1 (no source): the last
    sidx = i32(source)
    if len(set(sidx.tolist())) == 1:
        src_col: str | list[str] = src_names[sidx[0]] if n else "jsonl"
    else:
        src_col = [src_names[k] for k in sidx.tolist()]
    hostname = hostname_source = chain = None
    if hosts:
        hcol = [hosts[k] if k >= 0 else None for k in i32(host).tolist()]
        scol = [hsrcs[k] if k >= 0 else None for k in i32(hsrc).tolist()]
        hostname, hostname_source, chain = _host_columns(hcol, scol, [None] * n)
    t = FlowTable(proto, i64(sport), i64(dport), a_v4[si], a_hi[si], a_lo[si], a_v4[di], a_hi[di], a_lo[di],
                  i64(packets), i64(bytes_), first, last, src_col, hostname=hostname,
                  hostname_source=hostname_source, hostname_chain=chain)
    t._names = names
    return t


def _host_columns(hostname: list, source: list, chain: list):
    """(hostname, hostname_source, hostname_chain) object columns of a log's name fields, as
    `read_jsonl` takes them: canonical names, no source or chain without a name; all None if no row
    has a name."""
    host = _names(hostname)
    if host is None:
        return None, None, None
    hs = [s if h is not None else None for s, h in zip(source, host.tolist(), strict=True)]
    if not all(s is None or type(s) is str for s in hs):
        raise _NotPlain
    hs = [s if h else None for s, h in zip(hs, host.tolist(), strict=True)]  # as read_jsonl: no name, no source
    ch = []
    for raw, h in zip(chain, host.tolist(), strict=True):
        raw = raw if h is not None else None
        if raw is not None and (type(raw) is not list or not all(type(c) is str for c in raw)):
            raise _NotPlain
        ch.append(tuple(raw) if raw is not None else ())
    return host, object_column(hs), object_column(ch)


def _connection_columns(col) -> dict:
    """The connection columns of a log whose lines are connections (`opened_by` on every line), as
    `jsonl.connection_fields` reads them; {} when no line has one; _NotPlain for anything else
    (lines of both kinds, or a value the line reader would refuse: it names the field)."""
    opened = col("opened_by")
    if all(o is None for o in opened):
        if any(v is not None for k in CONNECTION_KEYS[1:] for v in col(k)):
            raise _NotPlain
        return {}
    if not all(type(o) is str and o in OPENED_CODE for o in opened):
        raise _NotPlain
    flags = {}
    for k in ("tcp_flags", "tcp_flags_reply"):
        vals = col(k)
        if not all(v is None or (type(v) is str and len(v) <= 8 and set(v) <= _FLAG_SET) for v in vals):
            raise _NotPlain
        flags[k] = [0 if v is None else sum(1 << TCP_FLAG_LETTERS.index(c) for c in set(v)) for v in vals]
    return {"opened": [OPENED_CODE[o] for o in opened], "packets_reply": _ints(col("packets_reply"), 0, _I64_MAX),
            "bytes_reply": _ints(col("bytes_reply"), 0, _I64_MAX), "hints": flags["tcp_flags"],
            "hints_reply": flags["tcp_flags_reply"]}


_FLAG_SET = set(TCP_FLAG_LETTERS)


def _table(objs: list[dict], addr: dict | None = None, text: dict | None = None) -> FlowTable:
    """A table of plain flow objects. `addr` and `text`: the address memo of earlier chunks."""
    col = _Columns(objs)
    proto = [_PROTO.get(p) if type(p) is str else p for p in col("proto")]
    if not all(type(p) is int and 0 <= p < 256 for p in proto):
        raise _NotPlain
    addr = {} if addr is None else addr  # address text -> key words
    text = {} if text is None else text  # key words -> canonical text
    cols = {}
    for side in ("src", "dst"):
        vals = col(side)
        for v in set(vals):
            if type(v) is not str:
                raise _NotPlain
            if v not in addr:
                try:
                    c, w = _words(v)
                except ValueError:
                    raise _NotPlain from None
                addr[v] = w
                text[w] = c
        words = [addr[v] for v in vals]
        cols[side] = (np.array([w[0] for w in words], dtype=bool), np.array([w[1] for w in words], dtype=np.uint64),
                      np.array([w[2] for w in words], dtype=np.uint64))
    first = _times(col("first_seen"), 0.0)
    last = _times(col("last_seen"), first)
    source = col("source")
    if not all(s is None or type(s) is str for s in source):
        raise _NotPlain
    host, host_src, chain = _host_columns(col("hostname"), col("hostname_source"), col("hostname_chain"))
    t = FlowTable(proto, _ints(col("sport"), 0, _U16_MAX), _ints(col("dport"), 0, _U16_MAX),
                  *cols["src"], *cols["dst"], _ints(col("packets"), 1, _I64_MAX),
                  _ints(col("bytes"), 0, _I64_MAX), first, last, [s or "jsonl" for s in source],
                  hostname=host, hostname_source=host_src, hostname_chain=chain, **_connection_columns(col))
    t._names = text
    return t
