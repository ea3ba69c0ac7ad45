"""Build ctnetlink messages as the kernel lays them out, and damaged variants, for decoder tests.

Layout (include/uapi/linux/netfilter/nfnetlink_conntrack.h): a netlink header, struct nfgenmsg,
then attributes: CTA_TUPLE_ORIG (1) and CTA_TUPLE_REPLY (2), each nesting CTA_TUPLE_IP (1: V4_SRC 1,
V4_DST 2, V6_SRC 3, V6_DST 4) and CTA_TUPLE_PROTO (2: NUM 1, SRC_PORT 2, DST_PORT 3);
CTA_COUNTERS_ORIG (9: PACKETS 1, BYTES 2), CTA_ID (12), CTA_TIMESTAMP (20: START 1).
"""

from __future__ import annotations

import ipaddress
import random
import struct

NESTED = 0x8000
NEW, DELETE = 0, 2
NLM_F_CREATE = 0x400


def attr(atype: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), atype | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def tuple_nest(src: str, dst: str, proto: int, sport: int | None, dport: int | None) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    kinds = (1, 2) if len(s) == 4 else (3, 4)
    ip = attr(1, attr(kinds[0], s) + attr(kinds[1], d), True)
    pr = attr(1, bytes([proto]))
    if sport is not None:
        pr += attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    return ip + attr(2, pr, True)


def entry_attrs(src="192.0.2.10", sport=40000, dst="198.51.100.7", dport=443, proto=6, ct_id=77,
                packets=3, nbytes=180, start=0, reply_src=None, reply_dst=None) -> bytes:
    """The attributes of one conntrack entry; the reply tuple defaults to the mirror of the original
    (no NAT); ports are left out for ICMP (proto 1 or 58)."""
    ports = (None, None) if proto in (1, 58) else (sport, dport)
    body = attr(1, tuple_nest(src, dst, proto, *ports), True)
    body += attr(2, tuple_nest(reply_src or dst, reply_dst or src, proto, *ports[::-1]), True)
    body += attr(9, attr(1, struct.pack(">Q", packets)) + attr(2, struct.pack(">Q", nbytes)), True)
    body += attr(12, struct.pack(">I", ct_id))
    if start:
        body += attr(20, attr(1, struct.pack(">Q", start)), True)
    return body


def message(body: bytes, kind: int = NEW, flags: int = NLM_F_CREATE, family: int = 2,
            mtype: int | None = None) -> bytes:
    """A whole netlink message (header, nfgenmsg, `body`); `mtype` overrides the ctnetlink type."""
    payload = struct.pack("=BBH", family, 0, 0) + body
    t = (1 << 8) | kind if mtype is None else mtype
    return struct.pack("=IHHII", 16 + len(payload), t, flags, 0, 0) + payload + b"\0" * (-len(payload) % 4)


def random_entry(rnd: random.Random) -> bytes:
    """A message a kernel could send: either family, TCP/UDP/ICMP, NAT or not, timestamps or not."""
    v6 = rnd.random() < 0.5
    host = (lambda: f"2001:db8:{rnd.getrandbits(16):x}::{rnd.getrandbits(16):x}") if v6 else \
        (lambda: f"{rnd.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rnd.randrange(256)}")
    src, dst = host(), host()
    kw = {}
    if rnd.random() < 0.2:
        kw["reply_src"] = host()
    if rnd.random() < 0.2:
        kw["reply_dst"] = host()
    proto = rnd.choice((6, 17, 132, 58 if v6 else 1))
    body = entry_attrs(src, rnd.randrange(65536), dst, rnd.randrange(65536), proto, rnd.getrandbits(32),
                       rnd.getrandbits(rnd.choice((8, 40, 64))), rnd.getrandbits(rnd.choice((16, 64))),
                       rnd.choice((0, rnd.getrandbits(63))), **kw)
    return message(body, kind=rnd.choice((NEW, NEW, DELETE)), flags=rnd.choice((NLM_F_CREATE, 0)),
                   family=10 if v6 else 2)


def damage(msg: bytes, rnd: random.Random) -> bytes:
    """One random structural fault: flipped bytes, a cut, a grown or shrunk length field, an extra
    or duplicated attribute, or a spliced piece of itself."""
    b = bytearray(msg)
    if len(b) < 24:  # already cut short: add a few random bytes
        return bytes(b) + bytes(rnd.randrange(256) for _ in range(rnd.randrange(8)))
    choice = rnd.randrange(6)
    if choice == 0:
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
    elif choice == 1:
        del b[rnd.randrange(16, len(b)):]
    elif choice == 2:  # an attribute length field (anywhere 2-byte aligned after the headers)
        at = rnd.randrange(20, len(b) - 1) & ~1
        struct.pack_into("=H", b, at, rnd.choice((0, 3, 4, 5, 0xFFFF, rnd.randrange(65536))))
    elif choice == 3:
        b += attr(rnd.randrange(32), bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(24))),
                  rnd.random() < 0.5)
    elif choice == 4:  # a nest repeated: the last one must win in every decoder
        b += b[20:20 + rnd.randrange(4, 64)]
    else:
        i, j = sorted(rnd.sample(range(20, len(b)), 2))
        b[i:i] = b[rnd.randrange(20, len(b)):][: j - i]
    if rnd.random() < 0.5 and len(b) >= 4:  # keep the netlink length honest half of the time
        struct.pack_into("=I", b, 0, len(b))
    return bytes(b)
