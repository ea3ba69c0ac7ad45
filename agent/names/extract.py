"""Packets in, names out: the one extractor behind `audit` on captures and the live capture source.

Contract:
- `NameExtractor.feed(segment, at)` takes one TCP or UDP segment (see `packet.py`) seen at `at`
  (POSIX seconds). DNS queries (UDP to port 53 or 5353) are remembered, and a response (from port
  53 or 5353) fills the answer cache only when it answers one of them (same id, name, client and
  resolver addresses and ports, within QUERY_WINDOW) or comes from a trusted resolver; any other is
  counted `dns_unsolicited` and ignored, and a TTL above `max_ttl` is cut to it. The client's
  first TCP bytes are reassembled until a ClientHello is complete (it may span segments and
  records); client QUIC Initials (UDP datagrams from 1,200 octets, the minimum RFC 9000 pads client
  Initials to) are opened and their CRYPTO frames joined. It returns the flow key a TLS or QUIC
  hello just named (`Named`), or a key whose first client bytes showed it carries no name
  (`NoHello`), else None. (The live daemon does not act on these yet: new flows wait a fixed
  `name_wait`; releasing a flow early on `Named`/`NoHello` is what they are for.)
- `name_flow(proto, src, sport, dst, dport, at)` -> `Name` or None: the server name of that
  5-tuple's hello (`sni` for TCP, `quic-sni` for UDP) wins over a DNS answer (`dns`, see
  `answers.py`); an IP literal in SNI is not a name.
- Malformed DNS, TLS and QUIC are counted in `counts` (by kind) and skipped; nothing raises.
Every table is bounded; evictions are counted.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter, OrderedDict
from typing import NamedTuple

from agent.names import dns, quic, tls
from agent.names.answers import AnswerCache
from agent.names.packet import TCP, UDP, Segment

DNS_PORTS = (53, 5353)
QUERY_WINDOW = 10.0  # seconds an answer may come after its query (resolvers give up well before)
MAX_QUERIES = 65536  # queries awaiting an answer; the oldest are dropped first (counted)
MAX_TTL = 86400  # an answer names an address for at most a day, whatever TTL it claims
# Counts of `stats()` that say a name was refused or forgotten (the metric's bounded `kind` label)
NAME_EVENTS = ("dns_unsolicited", "dns_ttl_capped", "dns_queries_evicted", "dns_answers_evicted",
               "quic_streams_evicted", "quic_not_first_flight", "quic_over_budget", "tls_streams_evicted",
               "tls_orphans_evicted", "named_evicted", "quic_unknown_version")
QUIC_BUDGET = 2000  # Initials opened per second of capture time at most (~87 us each): the rest are counted
STREAM_TTL = 30.0  # seconds a split ClientHello may take to complete before its slot may be reused
QUIC_MIN_DATAGRAM = 1200
MAX_PENDING = 4096  # TCP streams waiting for the rest of a ClientHello
MAX_NAMED = 262144  # 5-tuples named by a hello
MAX_SEGMENTS = 16  # out-of-order segments held per stream
MAX_ORPHANS = 1024  # flows whose first payload segment was not a hello start: kept in case it comes later
ORPHAN_SEGMENTS = 4


class Name(NamedTuple):
    hostname: str
    source: str  # sni, quic-sni, dns
    chain: tuple[str, ...] = ()  # dns: the CNAME chain from the asked name to the address owner


class Named(NamedTuple):
    key: tuple
    name: str


class NoHello(NamedTuple):
    key: tuple


def packed(text: str) -> bytes:
    """Canonical address text -> the 16-byte form segments and the answer cache use."""
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return bytes(12) + socket.inet_pton(socket.AF_INET, text)


class _Stream:
    __slots__ = ("next_seq", "buf", "held", "started")

    def __init__(self, seq: int, data: bytes, held: dict[int, bytes] | None = None):
        self.next_seq = seq
        self.buf = bytearray()
        self.held: dict[int, bytes] = held or {}
        self.started = 0.0  # when its first segment was seen (capture time)
        self.append(data)

    def append(self, data: bytes):
        """Add in-order bytes, then every held segment that now fits."""
        while True:
            self.buf += data
            self.next_seq = (self.next_seq + len(data)) & 0xFFFFFFFF
            data = self.held.pop(self.next_seq, None)
            if data is None:
                return


class NameExtractor:
    def __init__(self, dns_size: int = 262144, grace: float = 30.0, client_of=None, resolvers=(),
                 max_ttl: int = MAX_TTL):
        self.answers = AnswerCache(dns_size, grace)
        # Answers are believed only when they answer a query seen from that client to that resolver
        # (id, name, ports, within QUERY_WINDOW), or come from a resolver the operator trusts
        # (`resolvers`: packed 16-byte addresses). Anything else is counted as unsolicited: one
        # forged datagram from port 53 must not name an address.
        self.resolvers = frozenset(resolvers)
        self.max_ttl = max_ttl
        self._queries: OrderedDict[tuple, float] = OrderedDict()
        self.counts: Counter = Counter()
        # A client's identity for the answer cache: the live source maps all the host's own
        # addresses to one, because a stub resolver on loopback answers for every local address.
        self.client_of = client_of or (lambda addr: addr)
        self._named: OrderedDict[tuple, tuple[str, str]] = OrderedDict()
        self._streams: OrderedDict[tuple, _Stream] = OrderedDict()
        # segments that arrived before the start of their stream (reordering): {key: {seq: data}}
        self._orphans: OrderedDict[tuple, dict[int, bytes]] = OrderedDict()
        self._quic = quic.Assembler()
        self._quic_second, self._quic_spent = 0, 0  # the QUIC budget: Initials opened this second
        # the live capture thread feeds while the worker names flows: one lock keeps the tables whole
        self._lock = threading.Lock()
        # called as on_answer(qname, chain, packed address, ttl, at) for each believed address answer
        # (enforcement's allow-by-name sets); it must return at once (the capture thread calls it)
        self.on_answer = None

    # -- packets ---------------------------------------------------------------------------------

    def feed(self, seg: Segment, at: float) -> Named | NoHello | None:
        with self._lock:
            return self._feed(seg, at)

    def _feed(self, seg: Segment, at: float) -> Named | NoHello | None:
        if seg.proto == UDP:
            if seg.sport in DNS_PORTS:
                self._dns(seg, at)
                return None
            if seg.dport in DNS_PORTS:
                self._query(seg, at)
                return None
            if len(seg.payload) >= QUIC_MIN_DATAGRAM and seg.payload[0] & 0xC0 == 0xC0:
                return self._quic_initial(seg, at)
            return None
        if seg.proto == TCP and seg.payload:
            return self._tcp(seg, at)
        return None

    def _query(self, seg: Segment, at: float):
        qkey = dns.question_key(seg.payload, True)
        if qkey is None:
            return  # not a query an answer could be matched to; its answer counts as unsolicited
        self.add_query(seg.src, seg.sport, seg.dst, seg.dport, qkey, at)

    def add_query(self, client: bytes, cport: int, resolver: bytes, rport: int, qkey: bytes, at: float):
        """Remember a query (also as the C walk hands them over, already keyed)."""
        self.counts["dns_queries"] += 1
        key = (client, cport, resolver, rport, qkey)
        self._queries[key] = at
        self._queries.move_to_end(key)
        if len(self._queries) > MAX_QUERIES:
            self._queries.popitem(last=False)
            self.counts["dns_queries_evicted"] += 1

    def _dns(self, seg: Segment, at: float):
        try:
            r = dns.parse_response(seg.payload)
        except dns.Malformed:
            self.counts["dns_malformed"] += 1
            return
        self.counts["dns_responses"] += 1
        qkey = dns.question_key(seg.payload, False)
        asked = self._queries.pop((seg.dst, seg.dport, seg.src, seg.sport, qkey), None) if qkey else None
        if asked is None or not asked <= at <= asked + QUERY_WINDOW:
            if seg.src not in self.resolvers:
                self.counts["dns_unsolicited"] += 1
                return
        if r.rcode != 0:
            return
        client = self.client_of(seg.dst)
        for addr, ttl, chain in r.addresses():
            if ttl > self.max_ttl:
                self.counts["dns_ttl_capped"] += 1
                ttl = self.max_ttl
            self.answers.add(client, addr if len(addr) == 16 else bytes(12) + addr, r.qname, chain, ttl, at)
            if self.on_answer is not None:
                self.on_answer(r.qname, chain, addr, ttl, at)

    def _tcp(self, seg: Segment, at: float = 0.0):
        key = (TCP, seg.src, seg.sport, seg.dst, seg.dport)
        st = self._streams.get(key)
        if st is None:
            if key in self._named:
                return None
            p = seg.payload
            if p[0] != tls.HANDSHAKE or len(p) > 1 and p[1] != 3:
                # not the start of a TLS stream: other data, or a later segment of a hello whose start
                # comes next (reordered), which a few bounded slots keep
                held = self._orphans.get(key)
                if held is None:
                    held = self._orphans[key] = {}
                    if len(self._orphans) > MAX_ORPHANS:
                        self._orphans.popitem(last=False)
                        self.counts["tls_orphans_evicted"] += 1
                if len(held) < ORPHAN_SEGMENTS:
                    held[seg.seq] = p
                return None
            st = _Stream(seg.seq, p, self._orphans.pop(key, None))
        elif seg.seq == st.next_seq:
            st.append(seg.payload)
        elif (seg.seq - st.next_seq) & 0xFFFFFFFF < 1 << 31:  # ahead: hold it
            if len(st.held) < MAX_SEGMENTS:
                st.held[seg.seq] = seg.payload
            return None
        else:
            return None  # a retransmission of bytes we have
        try:
            got = tls.client_hello_from_records(bytes(st.buf))
        except tls.Malformed:
            self.counts["tls_malformed"] += 1
            self._streams.pop(key, None)
            return NoHello(key)
        if got == tls.NEED_MORE:
            if key not in self._streams:
                if len(self._streams) >= MAX_PENDING:
                    # Full: the oldest goes only when it is stale; otherwise the newest partial hello
                    # goes, so a flood of partial hellos cannot push out a real one that began earlier.
                    oldest = next(iter(self._streams))
                    stale = at - self._streams[oldest].started > STREAM_TTL
                    self._streams.popitem(last=not stale)
                    self.counts["tls_streams_evicted"] += 1
                st.started = at
                self._streams[key] = st
            return None
        self._streams.pop(key, None)
        if got == tls.NOT_TLS:
            return NoHello(key)
        self.counts["tls_hellos"] += 1
        return self._remember(key, got.sni, "sni")

    def _quic_initial(self, seg: Segment, at: float):
        p = seg.payload
        # Before any crypto: a client's first flight starts with an Initial whose destination
        # connection ID is 8 to 20 bytes (RFC 9000 7.2; v1 type 0, v2 type 1); anything else
        # cannot name a flow. Then a budget per second bounds what random-DCID floods cost.
        ptype, dlen = (p[0] >> 4) & 0x03, p[5] if len(p) > 5 else 0
        v2 = p[1:5] == b"\x6b\x33\x43\xcf"
        if ptype != (1 if v2 else 0) or dlen < 8:  # (over 20 is malformed: the reader says so)
            self.counts["quic_not_first_flight"] += 1
            return None
        second = int(at)
        if second != self._quic_second:
            self._quic_second, self._quic_spent = second, 0
        if self._quic_spent >= QUIC_BUDGET:
            self.counts["quic_over_budget"] += 1
            return None
        self._quic_spent += 1
        try:
            packets = quic.open_initials(seg.payload)
        except quic.Malformed:
            self.counts["quic_malformed"] += 1
            return None
        except quic.Undecryptable:
            self.counts["quic_undecryptable"] += 1
            return None
        except quic.UnknownVersion:
            self.counts["quic_unknown_version"] += 1  # greased or unknown, and not v1-sealed either
            return None
        key = (UDP, seg.src, seg.sport, seg.dst, seg.dport)
        for dcid, plain in packets:
            self.counts["quic_initials"] += 1
            try:
                msg = self._quic.add(key + (dcid,), quic.crypto_frames(plain))
                if msg is None:
                    continue
                hello = tls.parse_client_hello(msg)
            except (quic.Malformed, tls.Malformed):
                self.counts["quic_malformed"] += 1
                self._quic.drop(key + (dcid,))
                return NoHello(key)
            return self._remember(key, hello.sni, "quic-sni")
        return None

    def _remember(self, key: tuple, sni: str | None, source: str):
        if sni is None:
            return NoHello(key)
        self._named[key] = (sni, source)
        self._named.move_to_end(key)
        if len(self._named) > MAX_NAMED:
            self._named.popitem(last=False)
            self.counts["named_evicted"] += 1
        self.counts[f"names_{source}"] += 1
        return Named(key, sni)

    # -- flows -----------------------------------------------------------------------------------

    def name_flow(self, proto: int, src: str, sport: int, dst: str, dport: int, at: float) -> Name | None:
        s, d = packed(src), packed(dst)
        with self._lock:
            hit = self._named.get((proto, s, sport, d, dport))
            a = None if hit is not None else self.answers.lookup(self.client_of(s), d, at)
        if hit is not None:
            return Name(hit[0], hit[1])
        if a is not None:
            return Name(a.name, "dns", a.chain)
        return None

    def stats(self) -> dict:
        out = dict(self.counts)
        out["dns_answers_evicted"] = self.answers.evicted
        out["quic_streams_evicted"] = self._quic.evicted
        return out
