"""DNS responses -> the addresses a name was answered with, and the CNAME chain that led there.

Hand-decoded: every DNS response on the monitored links passes through here, and malformed or
hostile messages (compression loops, pointers past the end, counts larger than the message) must
cost microseconds and a counter, never an exception that escapes. Tests prove the answers equal to
scapy's DNS layer.

Contract: `parse_response(msg)` -> `Response` for a response (QR=1) with exactly one question,
or raises `Malformed` (with what is wrong); `question_key(msg, query)` is what pairs an answer with
the query it answers: an answer is only believed when it answers a query that was seen
(`agent.names.extract`). Names are lowercase text without the trailing dot;
a label with bytes outside printable ASCII is written with `\\DDD` escapes (RFC 4343), so it can
never match a policy name by accident. Only IN-class A, AAAA and CNAME answers are kept; the
rcode is returned so the caller can ignore NXDOMAIN and friends.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

_hdr = struct.Struct(">HHHHHH").unpack_from
_rr = struct.Struct(">HHIH").unpack_from
A, CNAME, AAAA, CLASS_IN = 1, 5, 28, 1
MAX_POINTERS = 64  # more compression jumps than any real name needs: a loop
MAX_RECORDS = 256


class Malformed(ValueError):
    """A message that is not a well-formed DNS response; the text says what is wrong."""


class Record(NamedTuple):
    owner: str
    rtype: int
    ttl: int
    data: bytes | str  # 4 or 16 address bytes (A, AAAA); the target name (CNAME)


class Response(NamedTuple):
    qname: str
    qtype: int
    rcode: int
    answers: tuple[Record, ...]
    id: int = 0

    def addresses(self) -> list[tuple[bytes, int, tuple[str, ...]]]:
        """(address bytes, TTL, chain) for each address answer reachable from the question.

        The chain runs from the name asked for through each CNAME to the owner of the address;
        its TTL is the smallest on the way, since the answer is only good while all links are.
        """
        cnames = {r.owner: r for r in self.answers if r.rtype == CNAME}
        out = []
        for r in self.answers:
            if r.rtype not in (A, AAAA):
                continue
            chain, ttl, name, seen = [r.owner], r.ttl, r.owner, {r.owner}
            if name != self.qname:
                # walk backwards: which CNAME pointed here, up to the question
                back = {str(c.data): c for c in cnames.values()}
                while name != self.qname:
                    c = back.get(name)
                    if c is None or c.owner in seen:
                        break
                    chain.append(c.owner)
                    ttl = min(ttl, c.ttl)
                    seen.add(c.owner)
                    name = c.owner
                if name != self.qname:
                    continue  # an address for a name the question does not lead to: not an answer
            out.append((r.data, ttl, tuple(reversed(chain))))
        return out


_PLAIN = re.compile(rb"[\x21-\x2d\x2f-\x5b\x5d-\x7e]*").fullmatch  # printable ASCII but '.' and '\\'


def _label_text(raw: bytes) -> str:
    if _PLAIN(raw):
        return raw.decode("ascii").lower()
    return "".join(chr(b).lower() if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}" for b in raw)


def read_name(msg: bytes, off: int) -> tuple[str, int]:
    """The name at `off` (following compression pointers) and the offset just after it in place."""
    labels, end, jumps, n, total = [], None, 0, len(msg), 0
    while True:
        if off >= n:
            raise Malformed(f"name runs past the end of the message at offset {off}")
        size = msg[off]
        if size >= 0xC0:
            if off + 1 >= n:
                raise Malformed(f"compression pointer cut off at offset {off}")
            if end is None:
                end = off + 2
            jumps += 1
            if jumps > MAX_POINTERS:
                raise Malformed("compression pointer loop")
            off = ((size & 0x3F) << 8) | msg[off + 1]
            continue
        if size > 63:
            raise Malformed(f"label type {size >> 6:#x} at offset {off} is not supported")
        if size == 0:
            break
        if off + 1 + size > n:
            raise Malformed(f"label at offset {off} runs past the end of the message")
        total += size + 1
        if total > 255:
            raise Malformed("name longer than 255 octets")
        labels.append(_label_text(msg[off + 1:off + 1 + size]))
        off += 1 + size
    return ".".join(labels), (end if end is not None else off + 1)


def parse_response(msg: bytes) -> Response:
    if len(msg) < 12:
        raise Malformed("shorter than a DNS header")
    _id, flags, qd, an, _ns, _ar = _hdr(msg, 0)
    if not flags & 0x8000:
        raise Malformed("a query, not a response")
    if qd != 1:
        raise Malformed(f"{qd} questions (a response answers exactly one)")
    qname, off = read_name(msg, 12)
    if off + 4 > len(msg):
        raise Malformed("question cut off")
    qtype = struct.unpack_from(">H", msg, off)[0]
    off += 4
    answers = []
    for _ in range(min(an, MAX_RECORDS)):
        owner, off = read_name(msg, off)
        if off + 10 > len(msg):
            raise Malformed(f"resource record header cut off at offset {off}")
        rtype, rclass, ttl, rdlen = _rr(msg, off)
        off += 10
        if off + rdlen > len(msg):
            raise Malformed(f"record data of {owner or '.'} runs past the end of the message")
        if rclass == CLASS_IN:
            if rtype == A and rdlen == 4 or rtype == AAAA and rdlen == 16:
                answers.append(Record(owner, rtype, ttl & 0x7FFFFFFF, msg[off:off + rdlen]))
            elif rtype == CNAME:
                target, _ = read_name(msg, off)
                answers.append(Record(owner, rtype, ttl & 0x7FFFFFFF, target))
            elif rtype in (A, AAAA):
                raise Malformed(f"{'A' if rtype == A else 'AAAA'} record of {owner} has {rdlen} data octets")
        off += rdlen
    return Response(qname, qtype, flags & 0x000F, tuple(answers), _id)


def question_key(msg: bytes, query: bool) -> bytes | None:
    """What matches an answer to its query: the id and the question section (name, type, class) as
    sent, ASCII-lowercased (a resolver copies the question back; 0x20 case games change nothing).
    None unless `msg` is a query (query=True) or a response with one uncompressed question. The C
    walk computes the same key for the queries it hands over (`_walk.c` query_key)."""
    if len(msg) < 17 or bool(msg[2] & 0x80) == query or msg[4] != 0 or msg[5] != 1:
        return None
    off = 12
    while True:
        if off >= len(msg):
            return None
        b = msg[off]
        if b == 0:
            break
        if b & 0xC0:
            return None
        off += 1 + b
        if off - 12 > 255:
            return None
    end = off + 5
    if end > len(msg):
        return None
    return (bytes(msg[0:2]) + bytes(msg[12:end])).lower()
