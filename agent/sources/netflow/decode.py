"""NetFlow v5, v9 (RFC 3954) and IPFIX (RFC 7011) export datagrams -> one-way flow records.

Contract: `Collector().datagram(data, exporter, now)` decodes one UDP payload from `exporter` (its
address text) and returns the flow records it holds, as `Record`s; it never raises. What it could
not use is counted in `Collector.counts` by kind (bounded keys: KINDS), and export loss (sequence
numbers that skipped) in `Collector.lost` per exporter, so records judged + dropped + lost account
for what the exporter sent. The version field tells the formats apart on one port.

State, all bounded: templates and options templates per (exporter, source id / observation domain,
template id) (TEMPLATES_MAX, then the oldest domain is forgotten: counted), the sampling interval
an options record announced per (exporter, domain), IPFIX's systemInitTimeMilliseconds per domain
(for sysUptime-relative times), and data sets that arrived before their template (PENDING_MAX per
template, replayed when it comes; beyond that counted as `no_template`). A template re-sent with
the same id replaces the old one; an IPFIX template record with no fields withdraws it (id 2 or 3
with no fields: all of that domain's templates or options templates).

Times: v5 and v9 FIRST/LAST_SWITCHED are milliseconds of sysUptime, turned absolute with the
header's clock (unix_secs at sys_uptime; the difference as a signed 32-bit count, since both wrap
every 49.7 days); IPFIX flowStart/End Seconds, Milliseconds, Microseconds
and Nanoseconds (NTP format) are absolute; sysUptime-relative IPFIX times use the domain's
systemInitTimeMilliseconds, else the record is given the export time (and counted `no_time`).
Variable-length fields (length 65535) and enterprise fields are skipped by their lengths, but for
RFC 5103's reverse elements (enterprise 29305: reverse octets, packets and TCP flags), which make a
record a biflow: `Record.packets_reply` / `bytes_reply` are what its destination sent back, and its
source is the initiator.

Sampling: packets and bytes are multiplied by the interval (v5 header; v9/IPFIX sampling options:
samplingInterval 34, samplerRandomInterval 50, samplingPacketInterval 305 with 306 space; or those
fields on the record itself). `Record.sampled` is the interval used (1 when the exporter said it
does not sample); None when nothing said (counted `sampling_unknown`, and not guessed).

Why by hand: the formats are small and fixed, the project's decoders are pure Python with struct
elsewhere, and no maintained Python library decodes NetFlow v9/IPFIX templates (scapy's NetflowV9
layers need the templates fed per packet and raise on malformed sets). tests/sources/test_netflow.py
checks the records against softflowd's own exports of the same captures. The common data set (a
fixed-length flow template with an address pair and a start time) is read by the optional C
accelerator `_nfdata` from a plan made once per template (`_plan`); tests hold it equal to the
struct and field-loop paths here.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict
from typing import NamedTuple

try:  # the optional C reader of common data sets (setup.py builds it where a compiler exists)
    import agent.sources.netflow._nfdata as _nfdata
except ImportError:  # pragma: no cover - exercised where no compiler is present
    _nfdata = None

KINDS = ("malformed", "unknown_version", "no_template", "templates_evicted", "sampling_unknown", "no_time",
         "not_ip")
TEMPLATES_MAX = 4096  # templates kept over every exporter and domain
PENDING_MAX = 64  # data sets kept per (exporter, domain, template id) until its template comes
PENDING_TOTAL = 4096
NTP_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01

_H16 = struct.Struct("!H").unpack_from
_H32 = struct.Struct("!I").unpack_from
_V5_HEAD = struct.Struct("!HHIIIIBBH")
_V5_REC = struct.Struct("!4s4s4sHHIIIIHHxBBBHHBBxx")
_V9_HEAD = struct.Struct("!HHIIII")
_IPFIX_HEAD = struct.Struct("!HHIII")


class Record(NamedTuple):
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    packets: int  # scaled by `sampled`
    bytes: int
    first: float
    last: float
    tcp_flags: int
    exporter: str
    sampled: int | None  # the sampling interval applied; None: the exporter did not say
    direction: int | None  # flowDirection (0 ingress, 1 egress) when the record has it
    in_if: int | None
    out_if: int | None
    # a biflow (RFC 5103): what the destination sent back (reverse information elements), scaled;
    # None for a one-way record. Its source is the initiator (the sender of the first packet).
    packets_reply: int | None = None
    bytes_reply: int | None = None
    tcp_flags_reply: int = 0


# field id -> name, for the fields a flow record needs (v9 and IPFIX share these numbers)
_FIELDS = {1: "bytes", 2: "packets", 4: "proto", 6: "flags", 7: "sport", 8: "src4", 10: "in_if", 11: "dport",
           12: "dst4", 14: "out_if", 21: "last_up", 22: "first_up", 27: "src6", 28: "dst6", 32: "icmp",
           34: "interval", 35: "algorithm", 50: "interval", 61: "direction", 85: "bytes", 86: "packets",
           139: "icmp", 150: "start_s", 151: "end_s", 152: "start_ms", 153: "end_ms", 154: "start_us",
           155: "end_us", 156: "start_ns", 157: "end_ns", 160: "init_ms", 305: "pkt_interval",
           306: "pkt_space", 23: "out_bytes", 24: "out_packets"}


# RFC 5103 biflows: reverse information elements are the forward ones under this enterprise number
REVERSE_PEN = 29305
_REVERSE = {1: "rbytes", 2: "rpackets", 85: "rbytes", 86: "rpackets", 6: "rflags"}


def _uint(b) -> int:
    """A field's unsigned value: bytes as read, or an int the template's struct already unpacked."""
    return b if b.__class__ is int else int.from_bytes(b, "big")


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_AS_BYTES = {"src4", "dst4", "src6", "dst6", "start_us", "end_us", "start_ns", "end_ns"}


def _layout(fields: tuple) -> tuple[struct.Struct, tuple]:
    """One struct for a fixed-length template's records: the fields a record needs as ints (1, 2, 4 or
    8 octets) or bytes (addresses, NTP times, other lengths), the rest skipped as padding; and their
    names in order. A record then costs one unpack instead of a slice and a lookup per field."""
    fmt, names = "!", []
    for fid, length, ent in fields:
        name = _FIELDS.get(fid) if ent == 0 else _REVERSE.get(fid) if ent == REVERSE_PEN else None
        if name is None:
            fmt += f"{length}x"
            continue
        fmt += f"{length}s" if name in _AS_BYTES or length not in _INT_CODES else _INT_CODES[length]
        names.append(name)
    return struct.Struct(fmt), tuple(names)


_SLOTS = ("src", "dst", "proto", "sport", "dport", "packets", "bytes", "flags", "direction", "in_if", "out_if",
          "rpackets", "rbytes", "rflags", "start", "end", "first_up", "last_up")  # _nfdata's slots, in order
_UNITS = (("_ms", 0), ("_s", 1), ("_us", 2), ("_ns", 2))  # absolute times, in the order _times prefers them
_NUMERIC = frozenset(_SLOTS[2:14]) | {"first_up", "last_up", "out_packets", "out_bytes"}
_FIRST_UP = 2 * _SLOTS.index("first_up")  # its offset's place in a plan's spec


def _plan(fields: tuple):
    """How `_nfdata.records` reads a fixed-length flow template's records: (spec, units, has a start
    time); None when the template is not its shape (decode.py then reads it, with the same results)."""
    at: dict[str, tuple[int, int]] = {}
    off = 0
    for fid, length, ent in fields:
        name = _FIELDS.get(fid) if ent == 0 else _REVERSE.get(fid) if ent == REVERSE_PEN else None
        if name is not None:
            at[name] = (off, length)  # a name twice: the last one counts, as in the record's dict
        off += length
    if "interval" in at or "pkt_interval" in at:
        return None  # sampling said on the record itself: the Python path updates the domain's state
    fam = "4" if "src4" in at and "dst4" in at else "6" if "src6" in at and "dst6" in at else None
    if fam is None or {at["src" + fam][1], at["dst" + fam][1]} != {4 if fam == "4" else 16}:
        return None
    slot = {"src": at["src" + fam], "dst": at["dst" + fam]}
    for name in _NUMERIC:
        if name in at and not 1 <= at[name][1] <= 8:
            return None
    units = []
    for edge in ("start", "end"):
        unit = next(((u, code) for u, code in _UNITS if edge + u in at), None)
        if unit is not None:
            slot[edge] = at[edge + unit[0]]
            if unit[1] == 2 and slot[edge][1] != 8 or not 1 <= slot[edge][1] <= 8:
                return None
        units.append(unit[1] if unit else 0)
    for name in _SLOTS[2:]:
        if name in at and name not in ("start", "end"):
            slot[name] = at[name]
    if "packets" not in at and "out_packets" in at:
        slot["packets"] = at["out_packets"]
    if "bytes" not in at and "out_bytes" in at:
        slot["bytes"] = at["out_bytes"]
    spec = tuple(x for name in _SLOTS for x in slot.get(name, (-1, 0)))
    return spec, tuple(units), "start" in slot


def _uptime_time(now: float, uptime_ms: int, at_ms: int) -> float:
    """An exporter's sysUptime milliseconds as POSIX seconds, from the header's clock (`now` at
    uptime `uptime_ms`). Both count modulo 2^32 (49.7 days): the difference is taken as a signed
    32-bit number, so a flow that started just before the counter wrapped is still seconds old."""
    delta = (at_ms - uptime_ms) % (1 << 32)
    if delta >= 1 << 31:
        delta -= 1 << 32
    return now + delta / 1000.0


def _ntp(b: bytes) -> float:
    return _H32(b, 0)[0] - NTP_EPOCH + _H32(b, 4)[0] / 4294967296.0


class Collector:
    """Templates, sampling and sequence state of every exporter seen; see the module doc."""

    STRUCTS = True  # fixed-length templates read with one struct each (tests compare with the field loop)
    C = True  # common data sets read by _nfdata where it is built (tests compare with STRUCTS and the loop)

    def __init__(self):
        self.templates: OrderedDict[tuple, tuple] = OrderedDict()  # (exp, domain, tid) -> (fields, options?)
        self.sampling: dict[tuple, int] = {}  # (exp, domain) -> interval
        self.init_ms: dict[tuple, int] = {}  # (exp, domain) -> IPFIX systemInitTimeMilliseconds
        self.pending: dict[tuple, list] = {}  # (exp, domain, tid) -> [(set bytes, header facts)]
        self.npending = 0
        self.next_seq: OrderedDict[tuple, int] = OrderedDict()  # (exp, version, domain) -> next sequence number
        self.ipfix_prev: OrderedDict[tuple, tuple | None] = OrderedDict()  # (exp, 10, domain) -> last message's
        self.ipfix_mode: dict[tuple, str] = {}  # (seq, records, flow records); its numbering convention
        self.counts = dict.fromkeys(KINDS, 0)
        self._layouts: dict[tuple, tuple] = {}  # template fields -> (struct, names): see _layout
        self._plans: dict[tuple, tuple | None] = {}  # template fields -> _nfdata's plan: see _plan
        self.lost: dict[str, int] = {}  # exporter -> records the sequence numbers say were lost
        self.datagrams: dict[str, int] = {}  # exporter -> datagrams read

    # -- entry ------------------------------------------------------------------------------------
    def datagram(self, data: bytes, exporter: str, now: float) -> list[Record]:
        self.datagrams[exporter] = self.datagrams.get(exporter, 0) + 1
        if len(data) < 4:
            self.counts["malformed"] += 1
            return []
        version = _H16(data, 0)[0]
        try:
            if version == 5:
                return self._v5(data, exporter)
            if version == 9:
                return self._v9(data, exporter, now)
            if version == 10:
                return self._ipfix(data, exporter)
        except (struct.error, IndexError, ValueError, OverflowError):
            self.counts["malformed"] += 1
            return []
        self.counts["unknown_version"] += 1
        return []

    def _gap(self, key: tuple, seq: int):
        """Count the records a sequence gap says were lost (v5 and IPFIX number records, v9 packets:
        a v9 gap is counted as that many packets' worth of records unknown, one each)."""
        want = self.next_seq.get(key)
        if want is not None:
            gap = (seq - want) % (1 << 32)
            if 0 < gap < (1 << 31):  # ahead: lost; behind (reordered or restarted): nothing to count
                self.lost[key[0]] = self.lost.get(key[0], 0) + gap

    def _advance(self, key: tuple, seq: int):
        self.next_seq[key] = seq % (1 << 32)
        self.next_seq.move_to_end(key)
        if len(self.next_seq) > TEMPLATES_MAX:
            self.next_seq.pop(next(iter(self.next_seq)))

    # -- v5 ---------------------------------------------------------------------------------------
    def _v5(self, data: bytes, exp: str) -> list[Record]:
        _v, count, uptime, secs, nsecs, seq, etype, eid, samp = _V5_HEAD.unpack_from(data, 0)
        if count > 30 or len(data) < 24 + 48 * count:
            self.counts["malformed"] += 1
            return []
        key = (exp, 5, (etype << 8) | eid)
        self._gap(key, seq)
        self._advance(key, seq + count)
        interval = samp & 0x3FFF
        rate = interval if (samp >> 14) and interval > 1 else 1  # mode 0: not sampled
        now = secs + nsecs / 1e9
        out = []
        for i in range(count):
            (src, dst, _hop, in_if, out_if, pk, by, first, last, sport, dport, flags, proto, _tos, _sas, _das,
             _sm, _dm) = _V5_REC.unpack_from(data, 24 + 48 * i)
            ntop = socket.inet_ntop
            out.append(Record(proto, ntop(socket.AF_INET, src), sport, ntop(socket.AF_INET, dst), dport, pk * rate,
                              by * rate, _uptime_time(now, uptime, first), _uptime_time(now, uptime, last), flags,
                              exp, rate, None, in_if, out_if))
        return out

    # -- templates --------------------------------------------------------------------------------
    def _learn(self, key: tuple, fields: tuple, options: bool) -> list:
        """Keep a template; returns data sets that were waiting for it."""
        self.templates[key] = (fields, options)
        self.templates.move_to_end(key)
        while len(self.templates) > TEMPLATES_MAX:
            self.templates.popitem(last=False)
            self.counts["templates_evicted"] += 1
        waiting = self.pending.pop(key, [])
        self.npending -= len(waiting)
        return waiting

    def _wait(self, key: tuple, body: bytes, facts: tuple, records_hint: int):
        q = self.pending.setdefault(key, [])
        if len(q) >= PENDING_MAX or self.npending >= PENDING_TOTAL:
            self.counts["no_template"] += max(1, records_hint)
            if not q:
                del self.pending[key]
            return
        q.append((body, facts))
        self.npending += 1

    @staticmethod
    def _fields(data: bytes, p: int, n: int, ipfix: bool) -> tuple[tuple, int]:
        """n field specifiers from p: ((id, length, enterprise), ...), and the offset after them."""
        out = []
        for _ in range(n):
            fid, length = _H16(data, p)[0], _H16(data, p + 2)[0]
            p += 4
            ent = 0
            if ipfix and fid & 0x8000:
                ent = _H32(data, p)[0]
                fid &= 0x7FFF
                p += 4
            out.append((fid, length, ent))
        return tuple(out), p

    # -- v9 ---------------------------------------------------------------------------------------
    def _v9(self, data: bytes, exp: str, now: float) -> list[Record]:
        _v, _count, uptime, secs, seq, domain = _V9_HEAD.unpack_from(data, 0)
        self._gap((exp, 9, domain), seq)
        self._advance((exp, 9, domain), seq + 1)
        facts = (9, exp, domain, uptime, float(secs))
        out: list[Record] = []
        for sid, body in self._sets(data, 20):
            if sid == 0:
                q = 0
                while q + 4 <= len(body):
                    tid, n = _H16(body, q)[0], _H16(body, q + 2)[0]
                    if tid < 256 or q + 4 + 4 * n > len(body):
                        self.counts["malformed"] += 1
                        break
                    fields, q = self._fields(body, q + 4, n, False)
                    for b, f in self._learn((exp, domain, tid), fields, False):
                        out += self._data(b, f, self.templates[(exp, domain, tid)])
            elif sid == 1:
                q = 0
                while q + 6 <= len(body):
                    tid, slen, olen = _H16(body, q)[0], _H16(body, q + 2)[0], _H16(body, q + 4)[0]
                    if tid < 256 or slen % 4 or olen % 4 or q + 6 + slen + olen > len(body):
                        break  # the rest is padding (or malformed: nothing more to learn from it)
                    fields, q = self._fields(body, q + 6, (slen + olen) // 4, False)
                    for b, f in self._learn((exp, domain, tid), fields, True):
                        out += self._data(b, f, self.templates[(exp, domain, tid)])
            elif sid >= 256:
                t = self.templates.get((exp, domain, sid))
                if t is None:
                    self._wait((exp, domain, sid), body, facts, 1)
                else:
                    out += self._data(body, facts, t)
        return out

    def _sets(self, data: bytes, p: int):
        """(set id, body) of each flowset / set from offset p; a length that does not fit ends the
        datagram (counted malformed)."""
        while p + 4 <= len(data):
            sid, length = _H16(data, p)[0], _H16(data, p + 2)[0]
            if length < 4 or p + length > len(data):
                self.counts["malformed"] += 1
                return
            yield sid, data[p + 4:p + length]
            p += length

    # -- IPFIX ------------------------------------------------------------------------------------
    def _ipfix(self, data: bytes, exp: str) -> list[Record]:
        _v, total, export_time, seq, domain = _IPFIX_HEAD.unpack_from(data, 0)
        if total < 16 or total > len(data):
            self.counts["malformed"] += 1
            return []
        data = data[:total]
        facts = (10, exp, domain, None, float(export_time))
        out: list[Record] = []
        ndata = nflows = 0
        waited = False
        for sid, body in self._sets(data, 16):
            if sid in (2, 3):
                q = 0
                while q + 4 <= len(body):
                    tid, n = _H16(body, q)[0], _H16(body, q + 2)[0]
                    scope = 0
                    if n == 0:  # a withdrawal (RFC 7011 8.1): one template, or all of a kind (id 2 / 3)
                        self._withdraw(exp, domain, tid, sid == 3)
                        q += 4
                        continue
                    if sid == 3:
                        if q + 6 > len(body):
                            break
                        scope = _H16(body, q + 4)[0]
                        q += 2
                    if tid < 256 or scope > n:
                        self.counts["malformed"] += 1
                        break
                    fields, q = self._fields(body, q + 4, n, True)
                    if q > len(body):
                        self.counts["malformed"] += 1
                        break
                    for b, f in self._learn((exp, domain, tid), fields, sid == 3):
                        out += self._data(b, f, self.templates[(exp, domain, tid)])
            elif sid >= 256:
                t = self.templates.get((exp, domain, sid))
                if t is None:
                    self._wait((exp, domain, sid), body, facts, 1)
                    waited = True
                else:
                    got = self._data(body, facts, t)
                    out += got
                    ndata += self._last_count
                    nflows += 0 if t[1] else self._last_count
        self._ipfix_sequence((exp, 10, domain), seq, ndata, nflows, waited)
        return out

    # How an IPFIX exporter numbers its messages, learnt at its first two: RFC 7011 counts the data
    # records sent before the message (options records included); some exporters (softflowd) count
    # those up to and including it, or only flow records. Measured from how the second message's
    # number follows the first, so a convention is never taken for a loss.
    _CONVENTIONS = ("rfc", "rfc-flows", "inclusive", "inclusive-flows")

    def _ipfix_sequence(self, key: tuple, seq: int, n_all: int, n_flows: int, waited: bool):
        prev = self.ipfix_prev.get(key)
        if prev is not None:
            pseq, pa, pf = prev
            want = dict(zip(self._CONVENTIONS, (pseq + pa, pseq + pf, pseq + n_all, pseq + n_flows), strict=True))
            mode = self.ipfix_mode.get(key)
            if mode is None:
                mode = next((m for m, w in want.items() if (seq - w) % (1 << 32) == 0), "rfc")
                self.ipfix_mode[key] = mode
            gap = (seq - want[mode]) % (1 << 32)
            if 0 < gap < (1 << 31):  # ahead: lost; behind (reordered or restarted): nothing to count
                self.lost[key[0]] = self.lost.get(key[0], 0) + gap
        # records that waited for a template are not counted yet: the next number cannot be checked
        self.ipfix_prev[key] = None if waited else (seq, n_all, n_flows)
        self.ipfix_prev.move_to_end(key)
        while len(self.ipfix_prev) > TEMPLATES_MAX:
            self.ipfix_mode.pop(self.ipfix_prev.popitem(last=False)[0], None)

    def _withdraw(self, exp: str, domain: int, tid: int, options: bool):
        if tid in (2, 3):
            for k in [k for k, (_f, o) in self.templates.items() if k[:2] == (exp, domain) and o == (tid == 3)]:
                del self.templates[k]
        else:
            self.templates.pop((exp, domain, tid), None)

    # -- data records -----------------------------------------------------------------------------
    _last_count = 0

    def _data(self, body: bytes, facts: tuple, template: tuple) -> list[Record]:
        """The records of one data set; options records update the domain's sampling and clock."""
        version, exp, domain, uptime, export_time = facts
        fields, options = template
        fixed = all(length != 65535 for _f, length, _e in fields)
        size = sum(length for _f, length, _e in fields) if fixed else 0
        out: list[Record] = []

        def take(vals: dict):  # one record's fields: an options record updates state, a flow record is kept
            if options:
                self._option(exp, domain, vals)
            else:
                rec = self._record(vals, version, exp, domain, uptime, export_time)
                if rec is not None:
                    out.append(rec)

        if size and not options and self.C and _nfdata is not None:
            got = self._c_data(body, size, fields, exp, domain, uptime, export_time)
            if got is not None:
                return got
        if size and self.STRUCTS:  # fixed-length records: one struct per template (below: the general case)
            lay = self._layouts.get(fields)
            if lay is None:
                if len(self._layouts) >= TEMPLATES_MAX:
                    self._layouts.clear()
                lay = self._layouts[fields] = _layout(fields)
            n = len(body) // size
            st, names = lay
            for values in st.iter_unpack(body[:n * size]):
                take(dict(zip(names, values, strict=True)))
            self._last_count = n
            return out
        q, n = 0, 0
        while True:
            if fixed:
                if size == 0 or q + size > len(body):
                    break
            elif q >= len(body):
                break
            vals: dict = {}
            ok = True
            for fid, length, ent in fields:
                if length == 65535:  # variable length (RFC 7011 7)
                    if q >= len(body):
                        ok = False
                        break
                    length = body[q]
                    q += 1
                    if length == 255:
                        if q + 2 > len(body):
                            ok = False
                            break
                        length = _H16(body, q)[0]
                        q += 2
                if q + length > len(body):
                    ok = False
                    break
                if ent == 0 or ent == REVERSE_PEN:
                    name = _FIELDS.get(fid) if ent == 0 else _REVERSE.get(fid)
                    if name is not None:
                        vals[name] = body[q:q + length]
                q += length
            if not ok:
                if vals or not fixed:
                    self.counts["malformed"] += 1
                break  # the rest is padding
            n += 1
            take(vals)
        self._last_count = n
        return out

    def _c_data(self, body: bytes, size: int, fields: tuple, exp: str, domain: int, uptime,
                export_time: float) -> list[Record] | None:
        """A flow data set read in C, or None when its template or clock needs the Python path."""
        plan = self._plans.get(fields, False)
        if plan is False:
            if len(self._plans) >= TEMPLATES_MAX:
                self._plans.clear()
            plan = self._plans[fields] = _plan(fields)
        if plan is None:
            return None
        spec, units, absolute = plan
        if not absolute:  # sysUptime-relative times: the header's uptime (v9), or IPFIX's from its init time
            if spec[_FIRST_UP] < 0:
                return None  # no time at all: counted no_time by the Python path
            uptime = self._uptime(exp, domain, uptime, export_time)
            if uptime is None:
                return None
        rate = self.sampling.get((exp, domain))
        out = _nfdata.records(body, size, spec, units, Record, exp, rate, 0 if absolute else 1, export_time,
                              0 if absolute else uptime % (1 << 32))
        if rate is None:
            self.counts["sampling_unknown"] += len(out)
        self._last_count = len(out)
        return out

    def _option(self, exp: str, domain: int, vals: dict):
        interval = vals.get("interval") or vals.get("pkt_interval")
        if interval is not None:
            iv = _uint(interval)
            space = _uint(vals["pkt_space"]) if "pkt_space" in vals else None
            if space is not None and "pkt_interval" in vals:
                iv = (iv + space) // max(iv, 1) if iv else 0  # 1 in (interval + space) / interval
            self.sampling[(exp, domain)] = max(1, iv)
        if "init_ms" in vals:
            self.init_ms[(exp, domain)] = _uint(vals["init_ms"])

    def _record(self, v: dict, version: int, exp: str, domain: int, uptime, export_time: float) -> Record | None:
        if "src4" in v and "dst4" in v:
            src, dst = socket.inet_ntop(socket.AF_INET, v["src4"]), socket.inet_ntop(socket.AF_INET, v["dst4"])
        elif "src6" in v and "dst6" in v:
            src, dst = socket.inet_ntop(socket.AF_INET6, v["src6"]), socket.inet_ntop(socket.AF_INET6, v["dst6"])
        else:
            self.counts["not_ip"] += 1
            return None
        proto = _uint(v["proto"]) if "proto" in v else 0
        sport = _uint(v["sport"]) if "sport" in v else 0
        dport = _uint(v["dport"]) if "dport" in v else 0
        if proto in (1, 58):
            sport = dport = 0  # as the capture decoder keys ICMP (type and code are no ports)
        packets = _uint(v["packets"]) if "packets" in v else _uint(v.get("out_packets", b"\x01"))
        nbytes = _uint(v["bytes"]) if "bytes" in v else _uint(v.get("out_bytes", b"\x00"))
        if "interval" in v or "pkt_interval" in v:  # sampling said on the record itself
            self._option(exp, domain, v)
        rate = self.sampling.get((exp, domain))
        if rate is None:
            self.counts["sampling_unknown"] += 1
        first, last = self._times(v, exp, domain, uptime, export_time)
        scale = rate or 1
        biflow = "rbytes" in v or "rpackets" in v
        return Record(proto, src, sport, dst, dport, packets * scale, nbytes * scale, first, last,
                      _uint(v["flags"]) & 0xFF if "flags" in v else 0, exp, rate,
                      _uint(v["direction"]) if "direction" in v else None,
                      _uint(v["in_if"]) if "in_if" in v else None, _uint(v["out_if"]) if "out_if" in v else None,
                      _uint(v.get("rpackets", b"\0")) * scale if biflow else None,
                      _uint(v.get("rbytes", b"\0")) * scale if biflow else None,
                      _uint(v["rflags"]) & 0xFF if "rflags" in v else 0)

    def _uptime(self, exp: str, domain: int, uptime, export_time: float):
        """The exporter's sysUptime (ms) at export: the v9 header's, or IPFIX's from the domain's
        systemInitTimeMilliseconds; None when neither is known."""
        if uptime is None and (exp, domain) in self.init_ms:
            uptime = int(export_time * 1000) - self.init_ms[(exp, domain)]
        return uptime

    def _times(self, v: dict, exp: str, domain: int, uptime, export_time: float) -> tuple[float, float]:
        def absolute(prefix: str):
            for unit, scale in (("_ms", 1e-3), ("_s", 1.0), ("_us", None), ("_ns", None)):
                b = v.get(prefix + unit)
                if b is not None:
                    return _ntp(b) if scale is None else _uint(b) * scale
            return None

        first, last = absolute("start"), absolute("end")
        if first is None and "first_up" in v:
            uptime = self._uptime(exp, domain, uptime, export_time)
            if uptime is not None:
                first = _uptime_time(export_time, uptime, _uint(v["first_up"]))
                last = _uptime_time(export_time, uptime, _uint(v["last_up"])) if "last_up" in v else first
        if first is None:
            self.counts["no_time"] += 1
            first = export_time
        return first, last if last is not None else first
