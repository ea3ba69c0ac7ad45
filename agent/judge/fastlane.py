"""The live worker's lane for conntrack flows whose verdict is already known: the common case.

Contract: `FastLane(daemon).new(e, now, today, who)` handles a NEW conntrack event (or a
collector's "flow" item, a `NetflowEntry`: its records then carry the connection's members and the
exporter's facts as the full path writes them) exactly as `Daemon._handle(kind, e, now, who)` would
(same metrics, same evidence bytes, same state for its end) and returns True; or it returns False
having changed nothing but the locator's caches (an address it read the database for, which the full
path then finds located), and the caller takes the full path. `who` is the flow's process when the
daemon attributes flows (looked up once by the caller, `Daemon._dispatch`), else None.
It takes an event only when its verdict is cached already: it finds the destination's network in the
locator's network cache (reading the database for one not seen yet, as the full path would first),
and needs a plausible first-seen time (judged on its own day) and the verdict cache entry for the
flow's facts; and only when no per-flow input exists that the verdict or the records could depend
on beyond the event and its process (no host names, no policy that selects on processes, no
recipient register, no NAT on the entry). It is handed outbound connections only:
`Daemon._dispatch` sends an inbound one (kept while some policy judges them) down the full path,
where it is judged by the peer's location.
`end(state, e, now)` closes a flow this lane opened, as the full path closes one.
tests/test_fastlane.py holds both lanes equal, metric for metric and record byte for byte.

Why: the full path builds a Flow, a Location, a Judged and the flow's JSON through generic code,
~20 us a flow; a monitor that must judge every egress flow of a busy host spends its CPU there.
Here the facts are read from the event and the caches directly, and the parts of the evidence
records that depend only on the cache entry are serialised once per entry (about 3x cheaper).
"""

from __future__ import annotations

from bisect import bisect_right
from socket import AF_INET as _AF4
from socket import AF_INET6 as _AF6
from socket import inet_pton as _pton

from agent.enrich.scope import embedded_int, ip_parse
from agent.flow import Location, _process_json, flag_letters, iso_time, proto_name
from agent.judge.pipeline import PLAUSIBLE_FROM
from agent.policy.compiled import location_class
from agent.policy.engine import PEER_NOUN, _day
from agent.sinks.eventlog import _dumps, _shared_bytes, extra_members
from agent.sinks.metrics import country_label
from agent.sinks.records import _message_form
from agent.sources.netflow.collect import NetflowEntry

try:
    from agent.sinks._evidence import records as _c_records
except ImportError:  # the C module is optional
    _c_records = None

_MEMO_MAX = 4096
_PREFIX = f"{PEER_NOUN[False]} ".encode()
if _PREFIX != b"destination ":  # the noun agent.sinks._evidence writes
    _c_records = None
_EVENT = {k: b',"event":"%b","direction":"outbound",' % k for k in (b"new", b"end")}  # eventlog.record_body's


class _Where:
    """What `_shared_bytes` reads of a judgement: the location and the jurisdiction groups."""

    __slots__ = ("location", "jurisdictions")

    def __init__(self, location, jurisdictions):
        self.location, self.jurisdictions = location, jurisdictions


class Opened:
    """A flow this lane judged, kept until its end: the verdict cache entry and what the records
    and metrics of its end need."""

    __slots__ = ("entry", "first", "reported", "process")

    def __init__(self, entry, first: float, reported, process: bytes | None = None):
        self.entry, self.first, self.reported, self.process = entry, first, reported, process


class FastLane:
    def __init__(self, daemon, max_open: int, source: str):
        self.d = daemon
        self.max_open, self.source = max_open, source  # the daemon's bound on open flows, its source label
        self._loc: dict[int, tuple] = {}  # id(located fields) -> (fields, class, country label, Location)
        self._entry: dict[tuple, tuple] = {}  # (id(verdicts), id(fields)) -> see _entry_for
        self._proto: dict[int, bytes] = {}
        self._src: dict[str, tuple] = {}  # source address -> (its mask among the policies' source networks,)
        self._pipe = None  # the pipeline the memos were made for
        self._procs: dict[int, tuple] = {}  # id(Who) -> (the Who, its JSON)
        # (id of a location's database fields, masks, day, proto, port) -> (fields, pipeline, entry)
        self._facts: dict[tuple, tuple] = {}

    @staticmethod
    def usable(daemon) -> bool:
        """True when no flow can differ from another in anything but the event's own fields and its
        process (no host names, no register, no process-selecting policy, judged on its own day)."""
        p = daemon.pipeline
        return (daemon.names is None and p.register is None and not p._by_who and not p._by_host
                and p.as_of is None)

    def clear(self):
        self._loc.clear()
        self._entry.clear()
        self._facts.clear()

    def _location(self, vals: tuple) -> tuple:
        got = self._loc.get(id(vals))
        if got is None or got[0] is not vals:
            loc = Location("", "public", None, *vals)
            got = (vals, location_class(loc), country_label(loc), loc)
            if len(self._loc) >= _MEMO_MAX:
                self._loc.clear()
            self._loc[id(vals)] = got
        return got

    def new(self, e, now: float, today: int, who=None) -> bool:
        d = self.d
        pipe = d.pipeline
        if pipe is not self._pipe:  # a reload: per-source masks are the new policies'
            self._src.clear()
            self._pipe = pipe
        if e.nat_src or e.nat_dst:
            return False
        first = e.start_ns / 1e9 if e.start_ns else now
        day_n = int(first // 86400)
        if first < PLAUSIBLE_FROM or day_n - today > 1:
            return False  # judged at the as-of day, with a reason: the full path words it
        # Inline below: `ip_parse`, `Locator._network_hit` and `NetMask.mask_int` (a Python call each
        # costs about as much as its work here).
        dst = e.dst
        nf = type(e) is NetflowEntry
        try:
            # a collector's connection comes with its addresses parsed (NetflowEntry.dst_vn, src_vn)
            dvn = e.dst_vn if nf else None
            if dvn is not None:
                version, n = dvn
            elif ":" in dst:
                version, n = 6, int.from_bytes(_pton(_AF6, dst), "big")
            else:
                version, n = 4, int.from_bytes(_pton(_AF4, dst), "big")
            if version == 6:
                h = n >> 96  # only these prefixes can embed an IPv4 address (`embedded_int`)
                if (h == 0 or h == 0x0064FF9B or h == 0x20010000 or h >> 16 == 0x2002) and embedded_int(n) is not None:
                    return False
            svn = e.src_vn if nf else None  # a router's many hosts come parsed: not memoised
            src = None if svn is not None else self._src.get(e.src)
            if src is None:  # a host's flows come from a few addresses: their masks are memoised
                sv, sn = svn or ip_parse(e.src)  # not through ip_int's memo: a miss here is one there too
                sm = pipe._src_nets
                src = (sm._masks[sv][bisect_right(sm._starts[sv], sn) - 1] if sm else 0,)
                if svn is None:
                    if len(self._src) >= _MEMO_MAX:
                        self._src.clear()
                    self._src[e.src] = src
        except (OSError, ValueError, TypeError):
            return False
        loc = pipe.locator
        starts, ends, cached = loc._nets[version]
        i = bisect_right(starts, n) - 1
        if i < 0 or n > ends[i]:
            # A network not looked up yet: read the database here, as the full path would first (it
            # then finds the address cached), so a new network of a known verdict key takes this
            # lane. Not public, or no answer the locator keeps per network: the full path words it.
            if not getattr(loc, "dbs", None):
                return False
            loc.locate(dst)
            starts, ends, cached = loc._nets[version]
            i = bisect_right(starts, n) - 1
            if i < 0 or n > ends[i]:
                return False
        vals = cached[i]
        dn = pipe._dst_nets
        # The facts of the verdict key with the location as the identity of its database fields:
        # hashing those ids is cheaper than hashing the location's fields, and a memo entry found
        # for them stands for the same verdict cache key (checked: same fields, same pipeline).
        fk = (id(vals), dn._masks[version][bisect_right(dn._starts[version], n) - 1] if dn else 0, src[0], day_n,
              e.proto, e.dport if pipe._by_port else None)
        got = self._facts.get(fk)
        if got is None or got[0] is not vals or got[1] is not pipe:
            located = self._location(vals)
            day = _day(day_n)
            hit = pipe._cache.get((False, None, None, located[1], fk[1], fk[2], day, e.proto, fk[5], None, None))
            if hit is None:
                return False
            if len(self._facts) >= _MEMO_MAX:
                self._facts.clear()
            got = self._facts[fk] = (vals, pipe, self._entry_for(hit, located))
        entry = got[2]
        k = e[:6]
        if k in d.open:
            return True  # seen already (as the full path: nothing more)
        d.metrics.judged_counts(entry[1], entry[2], entry[3], e.bytes)
        reported = entry[0]
        process = None if who is None else self._process(who)
        if reported:  # last seen: now for a conntrack event, the records' own time for a collector's item
            self._records(entry, b"new", e, e.packets, e.bytes, first, e.last if nf else now, process)
        d.open[k] = [Opened(entry, first, reported, process), e.bytes, bool(reported)]
        if len(d.open) > self.max_open:
            d.open.popitem(last=False)
            d.metrics.state_evicted.labels(self.source).inc()
        return True

    def end(self, st: list, e, now: float):
        """A DESTROY for a flow this lane opened (`st` its state in `Daemon.open`)."""
        opened, counted, _ = st
        entry = opened.entry
        delta = max(0, e.bytes - counted)
        if delta:
            self.d.metrics.judged_counts(entry[1], entry[2], entry[3], delta, bytes_only=True)
        if opened.reported:
            self._records(entry, b"end", e, e.packets, e.bytes, opened.first, now, opened.process)

    def _entry_for(self, hit: tuple, located: tuple) -> tuple:
        """Per (verdict cache entry, location): (per reported verdict its record parts, verdicts,
        groups, country label, the cache entry and the fields, kept so their ids stay theirs)."""
        mk = (id(hit), id(located[0]))
        got = self._entry.get(mk)
        if got is not None and got[4] is hit and got[5] is located[0]:
            return got
        verdicts, groups, written_for = hit
        where = _Where(located[3], groups)
        parts = []
        for v in verdicts:
            if v.outcome not in self.d.reported_outcomes:
                continue
            head, tail, wb = _shared_bytes(where, v)
            mode, rest = _message_form(v.message, written_for)
            parts.append((head, mode, _dumps(rest)[1:-1], tail, b"," + wb, _dumps(v.message) if mode == 2 else b""))
        got = (tuple(parts), verdicts, groups, located[2], hit, located[0])
        if len(self._entry) >= _MEMO_MAX:
            self._entry.clear()
        self._entry[mk] = got
        return got

    def _process(self, who) -> bytes:
        """The flow's `process` member's JSON (as `Flow.to_json` has it), made once per Who object."""
        got = self._procs.get(id(who))
        if got is None or got[0] is not who:
            if len(self._procs) >= _MEMO_MAX:
                self._procs.clear()
            got = self._procs[id(who)] = (who, _dumps(_process_json(who)))
        return got[1]

    def _records(self, entry: tuple, event: bytes, e, packets: int, nbytes: int, first: float, last: float,
                 process: bytes | None = None):
        """The evidence records of a flow's reported verdicts, as `record_body` makes them; in C
        (agent.sinks._evidence) when it is built, else `_py_records`."""
        pj = self._proto.get(e.proto)
        if pj is None:
            pj = self._proto[e.proto] = _dumps(proto_name(e.proto))
        conn = None
        if type(e) is NetflowEntry:  # a collector's connection: its members and the exporter's facts
            conn, extra = _collector_parts(e)
        else:
            extra = None if not (e.nat_src or e.nat_dst) else \
                extra_members({"conntrack_id": e.ct_id, "nat": {"dst": e.nat_dst, "src": e.nat_src}})
        now = self.d.stamp()
        ev = _EVENT[event]
        if _c_records is None or not _c_records(self.d._records, entry[0], ev, now, e, packets, nbytes, first, last,
                                                pj, extra, process, conn):
            self._py_records(entry[0], ev, now, e, packets, nbytes, first, last, pj, extra, process, conn)

    def _py_records(self, parts, ev: bytes, now: bytes, e, packets: int, nbytes: int, first: float, last: float,
                    pj: bytes, extra: bytes | None, process: bytes | None = None, conn: bytes | None = None):
        src, dst = e.src.encode(), e.dst.encode()
        fs = iso_time(first).encode()
        ls = fs if last == first else iso_time(last).encode()
        flow = b'{"proto":%b,"src":"%b","sport":%d,"dst":"%b","dport":%d,"packets":%d,"bytes":%d,' \
               b'"first_seen":"%b","last_seen":"%b",%b%b}' % (
                   pj, src, e.sport, dst, e.dport, packets, nbytes, fs, ls,
                   b'"source":"conntrack"' if conn is None else conn,
                   b',"process":' + process if process is not None else b"")
        if extra is None:
            extra = b',"conntrack_id":%d' % e.ct_id
        out = self.d._records
        for head, mode, rest, tail, where, message in parts:
            if mode == 0:
                msg = b'"' + _PREFIX + dst + b" (" + rest + b'"'
            elif mode == 1:
                msg = b'"' + _PREFIX + dst + b" " + rest + b'"'
            else:
                msg = message
            out.append(b"".join((b'{"time":', now, ev, head, msg, tail, b',"flow":', flow, where)) + extra)


_PARTS: dict[tuple, tuple[bytes, bytes]] = {}  # _collector_parts' members but the reply counters, per their facts


def _collector_parts(e) -> tuple[bytes, bytes]:
    """A collector connection's flow members from opened_by to its source, as `Flow.to_json` writes
    them, and its evidence members (`NetflowEntry.ids`), as the full path writes them. All but the
    reply counters come from a few facts (exporter, interfaces, sampling, flags, who opened it):
    made once per combination of those (bounded), not per connection."""
    facts = (e.opened_by, e.proto == 6 and (e.flags, e.flags_reply), e.collector, e.exporter, e.exporter_address,
             e.in_if, e.out_if, e.sampled)
    got = _PARTS.get(facts)
    if got is None:
        tail = b""
        if e.proto == 6:
            tail = b',"tcp_flags":%b,"tcp_flags_reply":%b' % (_dumps(flag_letters(e.flags)),
                                                              _dumps(flag_letters(e.flags_reply)))
        got = (b'"opened_by":%b' % _dumps(e.opened_by), tail + b',"source":' + _dumps(f"{e.collector}:{e.exporter}"),
               extra_members(e.ids()))
        if len(_PARTS) >= _MEMO_MAX:
            _PARTS.clear()
        _PARTS[facts] = got
    head, tail, extra = got
    return b'%b,"packets_reply":%d,"bytes_reply":%d%b' % (head, e.packets_reply, e.bytes_reply, tail), extra
