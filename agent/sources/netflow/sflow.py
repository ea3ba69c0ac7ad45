"""sFlow version 5 datagrams -> sampled packets as one-way flow records (`decode.Record`).

Contract: `SflowDecoder().datagram(data, exporter, now)` decodes one UDP payload sent by `exporter`
(its address text) and returns a `Record` per sampled packet, scaled by the sample's sampling rate
(`packets` = rate, `bytes` = the packet's IP length x rate, `sampled` = rate); it never raises.
What it could not use is counted in `counts` by kind (bounded keys: KINDS) and sampled packets
the agent itself says it lost in `lost` per exporter, as the NetFlow `Collector` does, so that
"judged + dropped + lost" accounts for what the agents sampled.

Read: flow samples (format 1) and expanded flow samples (format 3) of enterprise 0, and in them
the raw packet header record (format 1: the first bytes of the packet, which go through
`agent.wire.decode.decode`, the decoder captures use: Ethernet, IPv4 or IPv6 headers) or, without
one, the sampled IPv4 / IPv6 records (formats 3 and 4). Counter samples and other records are
skipped by their lengths. Loss: a gap in a sample source's sample sequence numbers is that many
samples lost; the `drops` counter of a sample (packets the agent could not sample for lack of
resources) counts as lost too, by its increase.

Why by hand: as for NetFlow (see `decode.py`): XDR's fixed 4-byte words need no library, and no
maintained Python package decodes sFlow v5.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict

from agent.sources.netflow.decode import Record
from agent.wire import decode as dec

KINDS = ("malformed", "unknown_version", "no_header", "counter_samples", "not_ip")
SOURCES_MAX = 4096  # sample sources (agent, sub-agent, source id) whose sequence numbers are followed

_U32 = struct.Struct("!I").unpack_from
_HEAD_TAIL = struct.Struct("!IIII")  # sub-agent id, sequence number, uptime, samples
_FLOW = struct.Struct("!IIIIIIII")  # seq, source id, rate, pool, drops, input, output, records
_FLOW_X = struct.Struct("!IIIIIIIIIII")  # seq, id type, id index, rate, pool, drops, in fmt, in, out fmt, out, recs
_RAW = struct.Struct("!IIII")  # header protocol, frame length, stripped, header length
_IP4 = struct.Struct("!II4s4sIIII")  # length, protocol, src, dst, sport, dport, tcp flags, tos
_IP6 = struct.Struct("!II16s16sIIII")  # length, protocol, src, dst, sport, dport, tcp flags, priority
_LINKS = {1: dec.ETHERNET, 11: dec.RAW, 12: dec.RAW}  # sFlow header_protocol -> link type


def _addr(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


class SflowDecoder:
    """Sequence state per sample source; see the module doc."""

    def __init__(self):
        self.counts = dict.fromkeys(KINDS, 0)
        self.lost: dict[str, int] = {}  # exporter -> samples lost (sequence gaps, agent drops)
        self.datagrams: dict[str, int] = {}
        self._next: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # source -> (next seq, drops so far)

    def datagram(self, data: bytes, exporter: str, now: float) -> list[Record]:
        self.datagrams[exporter] = self.datagrams.get(exporter, 0) + 1
        try:
            return self._datagram(memoryview(data), exporter, now)
        except (struct.error, IndexError, ValueError):
            self.counts["malformed"] += 1
            return []

    def _datagram(self, data: memoryview, exp: str, now: float) -> list[Record]:
        if len(data) < 8:
            self.counts["malformed"] += 1
            return []
        if _U32(data, 0)[0] != 5:
            self.counts["unknown_version"] += 1
            return []
        atype = _U32(data, 4)[0]
        alen = 4 if atype == 1 else 16 if atype == 2 else None
        if alen is None:
            self.counts["malformed"] += 1
            return []
        agent = bytes(data[8:8 + alen])
        sub, _seq, _uptime, n = _HEAD_TAIL.unpack_from(data, 8 + alen)
        p = 8 + alen + 16
        out: list[Record] = []
        for fmt, body in self._items(data, p, n):
            if fmt is None or fmt >> 12:
                continue  # another enterprise's sample: skipped by its length
            if fmt in (1, 3):
                self._flow_sample(body, fmt == 3, (agent, sub), exp, now, out)
            elif fmt in (2, 4):
                self.counts["counter_samples"] += 1
        return out

    def _items(self, buf: memoryview, p: int, n: int):
        """(format, body) of n XDR items (samples, flow records) from offset p; an item cut short
        ends the walk, counted malformed, with a last (None, None)."""
        for _ in range(n):
            fmt, length = _U32(buf, p)[0], _U32(buf, p + 4)[0]
            body = buf[p + 8:p + 8 + length]
            if len(body) < length:
                self.counts["malformed"] += 1
                yield None, None
                return
            p += 8 + length
            yield fmt, body

    def _flow_sample(self, b: memoryview, expanded: bool, agent: tuple, exp: str, now: float, out: list):
        if expanded:
            seq, id_type, id_index, rate, _pool, drops, _if, in_if, _of, out_if, n = _FLOW_X.unpack_from(b, 0)
            source, p = (id_type << 24) | id_index, _FLOW_X.size
        else:
            seq, source, rate, _pool, drops, in_if, out_if, n = _FLOW.unpack_from(b, 0)
            p = _FLOW.size
            in_if, out_if = in_if & 0x3FFFFFFF, out_if & 0x3FFFFFFF
        self._sequence((*agent, source), seq, drops, exp)
        rate = max(rate, 1)
        fallback = None
        for fmt, rec in self._items(b, p, n):
            if fmt is None:
                return  # cut short: counted malformed
            if fmt == 1:
                got = self._raw_header(rec, rate, exp, now, in_if, out_if)
                if got is not None:
                    out.append(got)
                    return
            elif fmt in (3, 4) and fallback is None:
                fallback = (fmt, rec)
        if fallback is not None:
            fmt, rec = fallback
            length, proto, src, dst, sport, dport, flags, _tos = (_IP4 if fmt == 3 else _IP6).unpack_from(rec, 0)
            if proto in (1, 58):
                sport = dport = 0
            out.append(Record(proto, _addr(src), sport, _addr(dst), dport, rate, length * rate, now, now,
                              flags & 0xFF, exp, rate, None, in_if, out_if))
            return
        self.counts["no_header"] += 1

    def _raw_header(self, rec: memoryview, rate: int, exp: str, now: float, in_if: int, out_if: int):
        proto_code, frame, stripped, hlen = _RAW.unpack_from(rec, 0)
        link = _LINKS.get(proto_code)
        if link is None:
            self.counts["not_ip"] += 1
            return None
        header = bytes(rec[16:16 + hlen])
        d = dec.decode(link, header, max(frame - stripped, len(header)))
        if not isinstance(d, dec.Decoded):
            self.counts["not_ip" if d == "non-ip" else "malformed"] += 1
            return None
        v4 = d.version == 4
        src = socket.inet_ntop(socket.AF_INET, d.src[12:]) if v4 else socket.inet_ntop(socket.AF_INET6, d.src)
        dst = socket.inet_ntop(socket.AF_INET, d.dst[12:]) if v4 else socket.inet_ntop(socket.AF_INET6, d.dst)
        return Record(d.proto, src, d.sport, dst, d.dport, rate, d.iplen * rate, now, now, d.hints, exp, rate,
                      None, in_if, out_if)

    def _sequence(self, key: tuple, seq: int, drops: int, exp: str):
        """Samples lost: a gap in the source's sample numbers, and the increase of its drop counter."""
        prev = self._next.get(key)
        lost = 0
        if prev is not None:
            gap = (seq - prev[0]) % (1 << 32)
            if 0 < gap < (1 << 31):  # ahead: lost; behind (reordered or restarted): nothing to count
                lost += gap
            grew = (drops - prev[1]) % (1 << 32)
            if grew < (1 << 31):
                lost += grew
        if lost:
            self.lost[exp] = self.lost.get(exp, 0) + lost
        self._next[key] = ((seq + 1) % (1 << 32), drops)
        self._next.move_to_end(key)
        if len(self._next) > SOURCES_MAX:
            self._next.popitem(last=False)
