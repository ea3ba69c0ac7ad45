"""JSON-lines flow logs -> Flows: the product's own flow format, and evidence-log lines.

Each line is either a flow object (what `Flow.to_json` writes) or an evidence record holding one
under `"flow"`, so an evidence log can be replayed through `egress-agent audit`.
Required: proto, src, dst; optional: sport, dport, packets, bytes, first_seen, last_seen
(RFC 3339 or POSIX seconds), process, hostname (any IDNA form; kept in canonical A-label form),
hostname_source, hostname_chain.

Evidence records name the same flow several times (one line per verdict, and `new`/`open` then
`end` events with final counters): lines with a `conntrack_id` are merged per (id, tuple), the
last line winning, and evidence lines without one (the capture source) per (tuple, first seen), so
a replayed evidence log counts each flow once.

Contract: `read_jsonl(path)` -> (flows, stats). A bad line is a UserError naming file:line and
field. A last line cut off without its newline (a writer killed mid-line) is reported as
truncation, like a cut-off capture, and the rest is kept.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from socket import AF_INET as _AF4
from socket import AF_INET6 as _AF6
from socket import inet_ntop as _ntop
from socket import inet_pton as _pton

from agent.errors import UserError
from agent.flow import OPENED_CODE, PROTO_NUMBERS, TCP_FLAG_LETTERS, Flow, Who
from agent.names.hostnames import canonical

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - a dependency; the standard library still works
    _orjson = None


@dataclass
class JsonlStats:
    path: str
    format: str = "jsonl"
    lines: int = 0
    flows: int = 0
    truncated: bool = False
    truncated_offset: int | None = None
    warnings: list = field(default_factory=list)
    torn: int = 0  # evidence records cut off by a kill, skipped
    seq_holes: int = 0  # evidence records missing from `seq` without a gap record

    def to_json(self) -> dict:
        out = {"path": self.path, "format": self.format, "link_types": [], "packets": None,
               "lines": self.lines, "flows": self.flows, "malformed": self.torn, "truncated": self.truncated,
               "truncated_offset": self.truncated_offset, "warnings": self.warnings}
        if self.torn or self.seq_holes:
            out["evidence"] = {"torn_records": self.torn, "seq_missing": self.seq_holes}
        return out


MAX_LINE = 1 << 20  # bytes; a longer line is an input error, never a 2 GB allocation
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: datetime's limit
MAX_INT_DIGITS = 20  # a 64-bit counter has 20 digits; a 5,000-digit number is not a field
_WHO_INT = ("pid", "uid")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number with {len(text)} digits")
    return int(text)


def strict_loads(raw: bytes):
    """json.loads without NaN/Infinity and without huge integers; ValueError/RecursionError on bad input."""
    return json.loads(raw, parse_constant=_reject_constant, parse_int=_bounded_int)


_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_INT_DIGITS + 1))


def loads(raw: bytes):
    """`strict_loads`, fast: orjson for the common line (it rejects NaN/Infinity and invalid
    UTF-8 too), the standard library whenever orjson refuses or a long digit run could be an
    integer orjson would turn into a float, so acceptance and error messages stay those of
    `strict_loads`."""
    if _orjson is None or _LONG_DIGITS.search(raw):
        return strict_loads(raw)
    try:
        return _orjson.loads(raw)
    except _orjson.JSONDecodeError:
        return strict_loads(raw)


def _time(v, where: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        t = float(v)
    elif isinstance(v, str):
        try:
            d = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise UserError(f"{where}: '{v[:64]}' is not a time (RFC 3339 or POSIX seconds)") from None
        if d.tzinfo is None:  # a flow log without an offset is UTC, never the auditor's local zone
            d = d.replace(tzinfo=UTC)
        try:
            t = d.timestamp()
        except (OverflowError, ValueError):
            raise UserError(f"{where}: '{v[:64]}' is out of range") from None
    else:
        raise UserError(f"{where}: {_show(v)} is not a time (RFC 3339 or POSIX seconds)")
    if not 0 <= t <= MAX_TIME:
        raise UserError(f"{where}: {_show(v)} is out of range (1970-01-01 to 9999-12-31)")
    return t


def _show(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else f"'{v}'"
    return s if len(s) <= 64 else s[:61] + "..."


def _int(d: dict, key: str, where: str, default=0, hi=None) -> int:
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (hi is not None and v > hi):
        raise UserError(f"{where}{key}: {_show(v)} is not an integer" + (f" in 0-{hi}" if hi else " >= 0"))
    return v


_CANON: dict[str, str] = {}


def canonical_ip(v: str) -> str:
    """`str(ipaddress.ip_address(v))`, memoised, via inet_pton/inet_ntop where their spelling is
    the same (everything but the ::a.b.c.d forms and scoped addresses); ValueError if not an address."""
    c = _CANON.get(v)
    if c is not None:
        return c
    try:
        if ":" in v:
            packed = _pton(_AF6, v)
            c = None if packed[:10] == bytes(10) else _ntop(_AF6, packed)
        else:
            c = _ntop(_AF4, _pton(_AF4, v))
    except OSError:
        c = None
    if c is None:
        c = str(ipaddress.ip_address(v))  # the rare forms, and the exact error
    if len(_CANON) > 65536:
        _CANON.clear()
    _CANON[v] = c
    return c


def _addr(d: dict, key: str, where: str) -> str:
    if key not in d:
        raise UserError(f"{where}{key}: missing field")
    v = d[key]
    try:
        if not isinstance(v, str):
            raise TypeError
        return canonical_ip(v)
    except (ValueError, TypeError):
        raise UserError(f"{where}{key}: {_show(v)} is not an IP address") from None


def _proto(p, where: str) -> int:
    if isinstance(p, str) and p.lower() in PROTO_NUMBERS:
        return PROTO_NUMBERS[p.lower()]
    if isinstance(p, str) and p.isascii() and p.isdecimal() and len(p) <= 3 and int(p) < 256:
        return int(p)
    if isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 256:
        return p
    raise UserError(f"{where}proto: {_show(p)} is not a protocol name or number")


def _who(v, where: str) -> Who | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise UserError(f"{where}process: expected an object")
    out = {}
    for k in Who.__slots__:
        x = v.get(k)
        if x is None:
            continue
        ok = (isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 0xFFFFFFFF) if k in _WHO_INT \
            else isinstance(x, str)
        if not ok:
            kind = "an integer in 0-4294967295" if k in _WHO_INT else "a string"
            raise UserError(f"{where}process.{k}: {_show(x)} is not {kind}")
        out[k] = x
    return Who(**out)


def parse_flow(d, where: str) -> Flow:
    """One flow object (or an evidence record holding one under "flow") -> Flow; UserError naming the field."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object")
    # `where` becomes the prefix of every field name: "file:3: dst: ..." or "file:3: flow.dst: ...".
    if isinstance(d.get("flow"), dict):
        d, where = d["flow"], where + ": flow."
    else:
        where += ": "
    proto = _proto(d.get("proto"), where)
    first = _time(d["first_seen"], f"{where}first_seen") if d.get("first_seen") is not None else 0.0
    last = _time(d["last_seen"], f"{where}last_seen") if d.get("last_seen") is not None else first
    host, host_src, chain = d.get("hostname"), d.get("hostname_source"), ()
    if host is not None:
        if not isinstance(host, str):
            raise UserError(f"{where}hostname: {_show(host)} is not a string")
        try:
            host = canonical(host)
        except ValueError as e:
            raise UserError(f"{where}hostname: {e}") from None
        if host_src is not None and not isinstance(host_src, str):
            raise UserError(f"{where}hostname_source: {_show(host_src)} is not a string")
        raw_chain = d.get("hostname_chain")
        if raw_chain is not None:
            if not isinstance(raw_chain, list) or not all(isinstance(c, str) for c in raw_chain):
                raise UserError(f"{where}hostname_chain: expected a list of names")
            chain = tuple(raw_chain)
    src = d.get("source")
    if src is not None and not isinstance(src, str):
        raise UserError(f"{where}source: {_show(src)} is not a string")
    return Flow(proto=proto, src=_addr(d, "src", where), sport=_int(d, "sport", where, hi=65535),
                dst=_addr(d, "dst", where), dport=_int(d, "dport", where, hi=65535),
                packets=_int(d, "packets", where, default=1, hi=2**63 - 1),
                bytes=_int(d, "bytes", where, hi=2**63 - 1),
                first_seen=first, last_seen=last, source=src or "jsonl", who=_who(d.get("process"), where),
                hostname=host, hostname_source=host_src if host else None, hostname_chain=chain,
                **connection_fields(d, where))


def connection_fields(d: dict, where: str) -> dict:
    """A connection record's fields (`opened_by` and what the responder sent), as `Flow.to_json`
    writes them; {} for a one-way flow (an older log, or another tool's): `agent.connections`
    pairs those. Without `opened_by` the reply fields are refused: they would describe nothing."""
    opened = d.get("opened_by")
    if opened is None:
        for k in CONNECTION_KEYS[1:]:
            if d.get(k) is not None:
                raise UserError(f"{where}{k}: given without opened_by (who opened the connection)")
        return {}
    if opened not in OPENED_CODE:
        raise UserError(f"{where}opened_by: {_show(opened)} is not one of {', '.join(OPENED_CODE)}")
    return {"opened_by": opened, "packets_reply": _int(d, "packets_reply", where, hi=2**63 - 1),
            "bytes_reply": _int(d, "bytes_reply", where, hi=2**63 - 1),
            "tcp_flags": tcp_flags(d.get("tcp_flags"), f"{where}tcp_flags"),
            "tcp_flags_reply": tcp_flags(d.get("tcp_flags_reply"), f"{where}tcp_flags_reply")}


CONNECTION_KEYS = ("opened_by", "packets_reply", "bytes_reply", "tcp_flags", "tcp_flags_reply")


def tcp_flags(v, where: str) -> int:
    """TCP flags as `flag_letters` writes them ("FSPA"), back to their bits; absent: 0."""
    if v is None:
        return 0
    if not isinstance(v, str) or len(v) > 8 or not set(v) <= set(TCP_FLAG_LETTERS):
        raise UserError(f"{where}: {_show(v)} is not TCP flags (letters of {TCP_FLAG_LETTERS})")
    return sum(1 << TCP_FLAG_LETTERS.index(c) for c in set(v))


def gap_warning(path: str, lineno: int, gap: dict) -> str:
    """How a report words an evidence log's gap record."""
    return (f"{path}:{lineno}: evidence gap ({gap.get('reason')}, from {gap.get('from')} until {gap.get('until')}): "
            f"{gap.get('message')}")


def _lines(f, path: str, stats: JsonlStats):
    """(line number, byte offset, raw line) with each line bounded by MAX_LINE."""
    offset, lineno = 0, 0
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE:
            raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE:,} bytes (byte offset {offset}); "
                            "not a flow record")
        yield lineno, offset, raw
        offset += len(raw)


EVIDENCE_START = b'{"time":"'  # how every evidence record begins (`EvidenceLog.body`)


class _SeqCheck:
    """Holes in an evidence log's `seq` that no `gap` record explains: lines removed, or the live
    file renamed away and replaced. Each becomes a warning naming the line and the missing numbers."""

    def __init__(self, path: str, stats):
        self.path, self.stats = path, stats
        self.last: int | None = None
        self.evidence = False

    def check(self, obj, lineno: int):
        if not isinstance(obj, dict) or "event" not in obj:
            return
        seq = obj.get("seq")
        if type(seq) is not int:
            return
        self.evidence = True
        if self.last is not None and seq > self.last + 1 and obj.get("event") != "gap":
            missing = seq - self.last - 1
            self.stats.seq_holes += missing
            self.stats.warnings.append(f"{self.path}:{lineno}: evidence seq jumps from {self.last} to {seq}: "
                                       f"{missing} record(s) missing, with no gap record to say why (lines removed, "
                                       "or the file was replaced)")
        self.last = seq if self.last is None else max(self.last, seq)


def read_jsonl(path: str) -> tuple[list[Flow], JsonlStats]:
    stats = JsonlStats(path)
    flows = []
    merged: dict[tuple, int] = {}  # evidence flow identity -> index in flows
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None
    seqs = _SeqCheck(path, stats)
    with f:
        for lineno, start, raw in _lines(f, path, stats):
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                obj = loads(raw)
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply") from None
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not raw.endswith(b"\n"):
                    stats.truncated, stats.truncated_offset = True, start
                    stats.warnings.append(f"{path}:{lineno}: last line is cut off at byte offset {start}; "
                                          "ignored, everything before it kept")
                    break
                if seqs.evidence or raw.startswith(EVIDENCE_START):
                    # an evidence record cut off by a kill inside a write (an agent that predates
                    # the start-up repair, or a copy): its verdict is lost, the others are kept
                    stats.torn += 1
                    stats.warnings.append(f"{path}:{lineno}: a torn evidence record at byte offset {start} "
                                          "(cut off by a kill or crash); skipped, the records around it kept")
                    continue
                raise UserError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})") from None
            seqs.check(obj, lineno)
            if isinstance(obj, dict) and obj.get("event") in ("gap", "stop") and "flow" not in obj:
                if obj["event"] == "gap":  # the agent's own marker: evidence is missing here
                    stats.warnings.append(gap_warning(path, lineno, obj))
                continue
            flow = parse_flow(obj, f"{path}:{lineno}")
            ct_id = obj.get("conntrack_id") if isinstance(obj, dict) else None
            key = None
            if ct_id is not None:
                if not isinstance(ct_id, int) or isinstance(ct_id, bool) or not 0 <= ct_id <= 0xFFFFFFFF:
                    raise UserError(f"{path}:{lineno}: conntrack_id: {_show(ct_id)} is not an integer in 0-4294967295")
                key = (ct_id, flow.proto, flow.src, flow.sport, flow.dst, flow.dport)
            elif isinstance(obj, dict) and "event" in obj and isinstance(obj.get("flow"), dict):
                # an evidence record of a source without conntrack ids (capture): one line per verdict
                # of one flow, which its tuple and first packet time identify
                key = (None, flow.proto, flow.src, flow.sport, flow.dst, flow.dport, flow.first_seen)
            if key is not None:
                if key in merged:
                    old = flows[merged[key]]
                    flows[merged[key]] = flow if flow.bytes >= old.bytes else old
                    continue
                merged[key] = len(flows)
            flows.append(flow)
    stats.flows = len(flows)
    return flows, stats
