"""The conntrack socket filter against `Scoper.is_egress`, run in a cBPF interpreter.

The filter may pass what is not egress (Python decides), but must never drop an egress flow; for
IPv4 it must be exact. Messages are built in the kernel's event layout; a root test in
tests/test_loss_accounting.py shows the kernel runs the same program the same way.
"""

import ipaddress
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.enrich.scope import Scoper
from agent.sources.conntrack.filter import ACCEPT, DROP, program, run

SCOPER = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"],
                local_nets=["192.0.2.0/24", "2001:db8:1::/64"])
PROG = program(SCOPER)


def attr(atype: int, payload: bytes, nested=False) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), atype | (0x8000 if nested else 0)) + payload
    return body + b"\0" * (-len(body) % 4)


def event(src: str, dst: str, proto=17, sport=40000, dport=443, nested=True) -> bytes:
    """A ctnetlink NEW event as the kernel lays it out (original tuple first)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    v6 = s.version == 6
    ip = attr(3 if v6 else 1, s.packed) + attr(4 if v6 else 2, d.packed)
    ports = attr(1, bytes([proto])) + attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    orig = attr(1, attr(1, ip, nested) + attr(2, ports, nested), nested)
    body = struct.pack("=BBH", 10 if v6 else 2, 0, 0) + orig + attr(12, struct.pack(">I", 77))
    return struct.pack("=IHHII", 16 + len(body), 1 << 8, 0x400, 0, 0) + body


def verdict(src: str, dst: str, **kw) -> int:
    return run(PROG, event(src, dst, **kw))


def v4(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def v6(n: int) -> str:
    return str(ipaddress.IPv6Address(n))


def test_program_fits_and_examples():
    assert len(PROG) < 4096
    assert verdict("192.0.2.1", "203.0.113.9") == ACCEPT
    assert verdict("192.0.2.1", "127.0.0.1") == DROP
    assert verdict("192.0.2.1", "10.1.2.3") == DROP
    assert verdict("203.0.113.9", "192.0.2.1") == DROP  # inbound: the source is public
    assert verdict("2001:db8:1::1", "2001:db8:5::9") == ACCEPT
    assert verdict("::1", "::1") == DROP
    assert verdict("2001:db8:1::1", "fe80::1") == DROP
    assert verdict("192.0.2.1", "203.0.113.9", nested=False) == ACCEPT  # older kernels: no NESTED flag


def test_what_it_cannot_read_it_passes():
    good = event("192.0.2.1", "127.0.0.1")
    assert run(PROG, good) == DROP
    assert run(PROG, good[:40]) == ACCEPT  # short
    bad = bytearray(good)
    bad[28:32] = struct.pack("=HH", 8, 9)  # not CTA_IP_V4_SRC
    assert run(PROG, bytes(bad)) == ACCEPT
    bad = bytearray(good)
    bad[16] = 7  # another family
    assert run(PROG, bytes(bad)) == ACCEPT


def _boundaries(version):
    out = []
    for lo, hi, _ in SCOPER.ranges(version):
        out += [lo, hi, max(lo - 1, 0), hi + 1]
    top = (1 << (32 if version == 4 else 128)) - 1
    return [n for n in out if 0 <= n <= top]


def test_ipv4_is_exact_at_every_boundary():
    edges = _boundaries(4)
    rnd = random.Random(3)
    pairs = [(v4(rnd.choice(edges)), v4(rnd.choice(edges))) for _ in range(3000)]
    pairs += [("192.0.2.1", v4(n)) for n in edges] + [(v4(n), "203.0.113.9") for n in edges]
    for src, dst in pairs:
        want = ACCEPT if SCOPER.is_egress(src, dst) else DROP
        assert verdict(src, dst) == want, (src, dst)


def test_ipv6_never_drops_egress_at_any_boundary():
    edges = _boundaries(6)
    rnd = random.Random(5)
    dropped = 0
    for _ in range(3000):
        src, dst = v6(rnd.choice(edges)), v6(rnd.choice(edges))
        out = verdict(src, dst)
        if SCOPER.is_egress(src, dst):
            assert out == ACCEPT, (src, dst)
        dropped += out == DROP
    assert dropped > 500  # and it does filter a good share of what is not egress


@settings(max_examples=400, deadline=None)
@given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
def test_ipv4_random(src, dst):
    s, d = v4(src), v4(dst)
    assert verdict(s, d) == (ACCEPT if SCOPER.is_egress(s, d) else DROP)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 128) - 1))
def test_ipv6_random(src, dst):
    s, d = v6(src), v6(dst)
    if SCOPER.is_egress(s, d):
        assert verdict(s, d) == ACCEPT


PROG_IN = program(SCOPER, inbound=True)


def test_inbound_mode_passes_the_mirror_of_egress_exactly_for_ipv4():
    """With a policy judging inbound connections, a public peer's connection to a local host passes
    too; IPv4 stays exact (egress or inbound, nothing else), at every scope boundary."""
    assert run(PROG_IN, event("203.0.113.9", "192.0.2.1", proto=6, sport=50000, dport=22)) == ACCEPT
    assert run(PROG_IN, event("203.0.113.9", "198.51.100.7")) == DROP  # public to public: neither
    assert run(PROG_IN, event("192.0.2.1", "10.1.2.3")) == DROP
    edges = _boundaries(4)
    rnd = random.Random(11)
    pairs = [(v4(rnd.choice(edges)), v4(rnd.choice(edges))) for _ in range(3000)]
    for src, dst in pairs:
        want = SCOPER.is_egress(src, dst) or SCOPER.is_egress(dst, src)
        assert run(PROG_IN, event(src, dst)) == (ACCEPT if want else DROP), (src, dst)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 128) - 1), st.booleans())
def test_inbound_mode_never_drops_either_direction_for_ipv6(src, dst, near):
    s, d = v6(src), v6(dst)
    if near:  # the random pair next to this scope table's IPv6 boundaries, where mistakes would hide
        edges = _boundaries(6)
        s, d = v6(edges[src % len(edges)]), v6(edges[dst % len(edges)])
    if SCOPER.is_egress(s, d) or SCOPER.is_egress(d, s):
        assert run(PROG_IN, event(s, d)) == ACCEPT, (s, d)
    assert run(PROG_IN, event(s, d)) == ACCEPT or not SCOPER.is_egress(s, d)


def test_inbound_mode_still_filters():
    assert run(PROG_IN, event("::1", "::1")) == DROP
    assert run(PROG_IN, event("192.0.2.1", "127.0.0.1")) == DROP
    assert len(PROG_IN) < 4096
