"""The records that travel through the pipeline: Flow, Who, Location, Verdict, Outcome.

Contract: these are plain frozen, slotted dataclasses with no behaviour beyond conversion to and
from JSON-ready dicts. `flow.py` imports nothing of ours, so every layer can depend on it.
Times are POSIX seconds (float, UTC). Addresses are canonical text (`ipaddress` compressed form).
"""

from __future__ import annotations

import enum
import math
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 47: "gre", 50: "esp", 51: "ah"}
PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()} | {"icmpv6": 58}


def fast_init(cls):
    """Give a frozen, slotted dataclass an `__init__` ~3x cheaper than the generated one, same
    signature, same defaults, same frozen instances afterwards.

    Why: the generated `__init__` of a frozen class sets each field through `object.__setattr__`
    (~0.15 us a field: 2-3 us per Flow or Location, several per live flow). This one gives the
    instance a mutable twin class with the same slots for the duration of `__init__` (one
    `object.__setattr__`), assigns the fields plainly, and gives the class back. Field defaults must
    be plain values (no `default_factory`)."""
    names = [f.name for f in fields(cls)]
    twin = type(f"_Mutable{cls.__name__}", (), {"__slots__": tuple(names)})
    params, ns = [], {"_set": object.__setattr__, "_twin": twin, "_cls": cls}
    for f in fields(cls):
        if f.default_factory is not MISSING:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name} has a default_factory")
        if f.default is MISSING:
            params.append(f.name)
        else:
            ns[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
    body = "".join(f"    self.{n} = {n}\n" for n in names)
    exec(f"def __init__(self, {', '.join(params)}):\n    _set(self, '__class__', _twin)\n{body}"  # noqa: S102
         f"    self.__class__ = _cls\n", ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    return cls


TCP_FLAG_LETTERS = "FSRPAUEC"  # bit 0 (FIN) to bit 7 (CWR)
# How a connection's opener is known (`Flow.opened_by`; `agent.connections` decides). A FlowTable
# stores the index; 0: not known.
OPENED_BY = (None, "syn", "syn-ack", "icmp-echo", "icmp-error", "port", "first-packet", "conntrack")
OPENED_CODE = {name: i for i, name in enumerate(OPENED_BY) if name}


def _letters(flags: int) -> str:
    return "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if flags >> i & 1)


_FLAG_TEXT = tuple(_letters(f) for f in range(256))  # every record of a connection spells its flags


def flag_letters(flags: int) -> str:
    """TCP flags as letters in bit order: 0x12 -> "SA"."""
    return _FLAG_TEXT[flags] if 0 <= flags < 256 else _letters(flags)


def proto_name(num: int) -> str:
    return PROTO_NAMES.get(num, str(num))


_SECONDS: dict[int, str] = {}  # whole second -> "YYYY-MM-DDTHH:MM:SS" (flows of one second share it)


def iso_time(ts: float | None) -> str | None:
    """POSIX seconds -> RFC 3339 UTC with microseconds, or None: `datetime.fromtimestamp(ts, UTC)
    .isoformat()` with "Z", i.e. the fraction rounded half to even to the microsecond and left out
    when zero. Each second's text is formatted once; tests compare this with datetime's."""
    if ts is None:
        return None
    if ts < 0:
        return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)  # half to even, as datetime rounds
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    head = _SECONDS.get(sec)
    if head is None:
        head = datetime.fromtimestamp(sec, tz=UTC).isoformat()[:-6]  # without "+00:00"
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        _SECONDS[sec] = head
    return f"{head}.{us:06d}Z" if us else head + "Z"


def iso_parts(ts):
    """(whole seconds, microseconds) of each time, int64 arrays, rounded as `iso_time` rounds: the
    numbers its text is made of. Text order is (seconds, no fraction last, microseconds)."""
    import numpy as np

    ts = np.asarray(ts, dtype=np.float64)
    whole = np.floor(ts)
    us = np.rint((ts - whole) * 1e6)
    carry = us >= 1e6
    whole, us = whole + carry, np.where(carry, us - 1e6, us)
    return whole.astype("int64"), us.astype("int64")


def iso_times(ts, parts=None) -> list[str]:
    """`iso_time` of many times (a float array) at once; equal to it value for value.

    Rounds to the microsecond as `datetime.fromtimestamp` does (the fraction, half to even) and,
    like `isoformat`, leaves out a zero fraction. `parts`: `iso_parts(ts)`, when already made."""
    import numpy as np

    whole, us = iso_parts(ts) if parts is None else parts
    stamp = whole * 1_000_000 + us
    text = np.datetime_as_string(stamp.astype("datetime64[us]"), unit="us", timezone="UTC").tolist()
    for i in np.flatnonzero(us == 0).tolist():
        text[i] = text[i][:-8] + "Z"
    return text


@fast_init
@dataclass(frozen=True, slots=True)
class Who:
    """The local process behind a flow, when a live source could attribute it."""

    pid: int | None = None
    comm: str | None = None
    exe: str | None = None
    uid: int | None = None
    user: str | None = None
    unit: str | None = None
    container: str | None = None
    unattributed: str | None = None  # reason, when attribution failed


@fast_init
@dataclass(frozen=True, slots=True)
class Flow:
    """One aggregated flow: distinct (proto, src, sport, dst, dport) over a time span.

    `bytes` counts IP-layer octets (IPv4 total length; IPv6 40 + payload length), as NetFlow and
    conntrack do. `source` names the source that produced it (pcap, jsonl, conntrack, ...).

    A connection (`opened_by` set: how its opener is known, see `agent.connections`) is both
    directions of a 5-tuple: `src` opened it, `packets`/`bytes`/`tcp_flags` are what src sent and
    `packets_reply`/`bytes_reply`/`tcp_flags_reply` what dst sent back (TCP flags as bits: FIN 1,
    SYN 2, RST 4, PSH 8, ACK 16, URG 32, ECE 64, CWR 128). Without `opened_by` a flow is one
    direction as its source reported it (a live conntrack entry is its original direction).
    """

    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    packets: int = 1
    bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    source: str = ""
    who: Who | None = None
    hostname: str | None = None
    hostname_source: str | None = None  # sni, quic-sni, dns, or whatever a flow log said
    hostname_chain: tuple[str, ...] = ()  # dns: asked-for name, CNAME targets, owner of the address
    opened_by: str | None = None
    packets_reply: int = 0
    bytes_reply: int = 0
    tcp_flags: int = 0
    tcp_flags_reply: int = 0

    def to_json(self) -> dict:
        d = {
            "proto": proto_name(self.proto),
            "src": self.src,
            "sport": self.sport,
            "dst": self.dst,
            "dport": self.dport,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
        }
        if self.opened_by is not None:
            d["opened_by"] = self.opened_by
            d["packets_reply"] = self.packets_reply
            d["bytes_reply"] = self.bytes_reply
            if self.proto == 6:
                d["tcp_flags"] = flag_letters(self.tcp_flags)
                d["tcp_flags_reply"] = flag_letters(self.tcp_flags_reply)
        if self.source:
            d["source"] = self.source
        if self.hostname:
            d["hostname"] = self.hostname
            if self.hostname_source:
                d["hostname_source"] = self.hostname_source
            if len(self.hostname_chain) > 1:
                d["hostname_chain"] = list(self.hostname_chain)
        if self.who is not None:
            d["process"] = _process_json(self.who)
        return d


_PROCESS: dict[int, tuple] = {}  # id(Who) -> (the Who, its JSON items); the attributor reuses Who objects


def _process_json(w: Who) -> dict:
    """A flow's `process` object: the Who's fields that are known. A new dict each call (callers may
    change theirs); its items are worked out once per Who object (held, so its id stays its own)."""
    hit = _PROCESS.get(id(w))
    if hit is None:
        items = tuple((k, v) for k, v in (("pid", w.pid), ("comm", w.comm), ("exe", w.exe), ("uid", w.uid),
                                          ("user", w.user), ("unit", w.unit), ("container", w.container),
                                          ("unattributed", w.unattributed)) if v is not None)
        if len(_PROCESS) >= 4096:
            _PROCESS.clear()
        hit = _PROCESS[id(w)] = (w, items)
    return dict(hit[1])


@fast_init
@dataclass(frozen=True, slots=True)
class Location:
    """Where an address is, and how we know. Unknown is an answer: `unknown_reason` says why."""

    ip: str
    scope: str
    lookup_ip: str | None = None  # embedded IPv4 looked up instead (NAT64, 6to4, Teredo, mapped)
    country: str | None = None
    registered_country: str | None = None
    represented_country: str | None = None
    continent: str | None = None
    in_eu: bool | None = None
    anycast: bool = False
    asn: int | None = None
    as_org: str | None = None
    source: str | None = None  # e.g. "GeoIP2-City", "rir-registration", "fixture"
    provenance: tuple[tuple[str, str], ...] = ()  # ((database_type, build_date), ...)
    unknown_reason: str | None = None

    def to_json(self) -> dict:
        # by hand: dataclasses.asdict deep-copies every field and costs ~20 us per call
        return {"ip": self.ip, "scope": self.scope, "lookup_ip": self.lookup_ip, "country": self.country,
                "registered_country": self.registered_country, "represented_country": self.represented_country,
                "continent": self.continent, "in_eu": self.in_eu, "anycast": self.anycast, "asn": self.asn,
                "as_org": self.as_org, "source": self.source,
                "provenance": [{"database": db, "build_date": built} for db, built in self.provenance],
                "unknown_reason": self.unknown_reason}


class Outcome(enum.StrEnum):
    COMPLIANT = "compliant"
    VIOLATION = "violation"
    EXEMPT = "exempt"
    INDETERMINATE = "indeterminate"
    NOT_APPLICABLE = "not_applicable"


@fast_init
@dataclass(frozen=True, slots=True)
class Verdict:
    """The judgement of one policy on one flow, with a sentence a person can act on."""

    policy: str
    outcome: Outcome
    reason: str  # short machine code: outside-allowed, unknown-location:no-record, ...
    message: str
    severity: str = "medium"
    policy_file: str = ""
    policy_sha256: str = ""
    exception: str | None = None
    jurisdictions: tuple[str, ...] = field(default=())  # groups the destination country is in

    def to_json(self) -> dict:
        return {
            "policy": self.policy,
            "policy_file": self.policy_file,
            "policy_sha256": self.policy_sha256,
            "verdict": self.outcome.value,
            "reason": self.reason,
            "message": self.message,
            "severity": self.severity,
            "exception": self.exception,
        }
