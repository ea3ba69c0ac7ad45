"""JSON-lines flow logs -> Flows: the product's own flow format, and evidence-log lines.

Each line is either a flow object (what `Flow.to_json` writes) or an evidence record holding one
under `"flow"`, so an evidence log can be replayed through `egress-agent audit`.
Required: proto, src, dst; optional: sport, dport, packets, bytes, first_seen, last_seen
(RFC 3339 or POSIX seconds), process, hostname.

Evidence records name the same flow several times (one line per verdict, and `new`/`open` then
`end` events with final counters): lines with a `conntrack_id` are merged per (id, tuple), the
last line winning, so a replayed evidence log counts each flow once.

Contract: `read_jsonl(path)` -> (flows, stats). A bad line is a UserError naming file:line and
field. A last line cut off without its newline (a writer killed mid-line) is reported as
truncation, like a cut-off capture, and the rest is kept.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from datetime import datetime

from agent.errors import UserError
from agent.flow import PROTO_NUMBERS, Flow, Who


@dataclass
class JsonlStats:
    path: str
    format: str = "jsonl"
    lines: int = 0
    flows: int = 0
    truncated: bool = False
    truncated_offset: int | None = None
    warnings: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "link_types": [], "packets": None,
                "lines": self.lines, "flows": self.flows, "malformed": 0, "truncated": self.truncated,
                "truncated_offset": self.truncated_offset, "warnings": self.warnings}


def _time(v, where: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise UserError(f"{where}: '{v}' is not a time (RFC 3339 or POSIX seconds)")


def _int(d: dict, key: str, where: str, default=0, hi=None) -> int:
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (hi is not None and v > hi):
        raise UserError(f"{where}.{key}: '{v}' is not an integer" + (f" in 0-{hi}" if hi else " >= 0"))
    return v


def _addr(d: dict, key: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(d[key]))
    except KeyError:
        raise UserError(f"{where}: missing field '{key}'") from None
    except (ValueError, TypeError):
        raise UserError(f"{where}.{key}: '{d[key]}' is not an IP address") from None


def parse_flow(d, where: str) -> Flow:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object")
    if isinstance(d.get("flow"), dict):
        d, where = d["flow"], where + ": flow"
    p = d.get("proto")
    if isinstance(p, str) and p.lower() in PROTO_NUMBERS:
        proto = PROTO_NUMBERS[p.lower()]
    elif isinstance(p, str) and p.isdigit() and int(p) < 256:
        proto = int(p)
    elif isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 256:
        proto = p
    else:
        raise UserError(f"{where}.proto: '{p}' is not a protocol name or number")
    first = _time(d["first_seen"], f"{where}.first_seen") if d.get("first_seen") is not None else 0.0
    last = _time(d["last_seen"], f"{where}.last_seen") if d.get("last_seen") is not None else first
    who = None
    if isinstance(d.get("process"), dict):
        fields = set(Who.__slots__)
        who = Who(**{k: v for k, v in d["process"].items() if k in fields})
    host = d.get("hostname")
    return Flow(proto=proto, src=_addr(d, "src", where), sport=_int(d, "sport", where, hi=65535),
                dst=_addr(d, "dst", where), dport=_int(d, "dport", where, hi=65535),
                packets=_int(d, "packets", where, default=1), bytes=_int(d, "bytes", where),
                first_seen=first, last_seen=last, source=str(d.get("source") or "jsonl"), who=who,
                hostname=host if isinstance(host, str) else None)


def read_jsonl(path: str) -> tuple[list[Flow], JsonlStats]:
    stats = JsonlStats(path)
    flows = []
    merged: dict[tuple, int] = {}  # evidence flow identity -> index in flows
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not raw.endswith(b"\n"):
                    stats.truncated, stats.truncated_offset = True, start
                    stats.warnings.append(f"{path}:{lineno}: last line is cut off at byte offset {start}; "
                                          "ignored, everything before it kept")
                    break
                raise UserError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})") from None
            flow = parse_flow(obj, f"{path}:{lineno}")
            if isinstance(obj, dict) and obj.get("conntrack_id") is not None:
                key = (obj["conntrack_id"], flow.proto, flow.src, flow.sport, flow.dst, flow.dport)
                if key in merged:
                    old = flows[merged[key]]
                    flows[merged[key]] = flow if flow.bytes >= old.bytes else old
                    continue
                merged[key] = len(flows)
            flows.append(flow)
    stats.flows = len(flows)
    return flows, stats
