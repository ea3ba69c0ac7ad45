"""The C event reader (`_ctnl.c`) equals the Python decoder and event loop, message for message.

The Python decoder (`conntrack.decode_entry`) is the reference, proven equal to pyroute2 on real
kernel messages in test_conntrack.py (which also runs the C decoder over those messages). Here
both read kernel-shaped messages, damaged ones, and datagrams through a real socket.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.sources.conntrack import table as C
from tests.ctnl_messages import DELETE, NEW, NLM_F_CREATE, damage, entry_attrs, message, random_entry

ctnl = pytest.importorskip("agent.sources.conntrack._ctnl", reason="the C accelerator was not built")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def reference(msg: bytes):
    return C.decode_entry(msg, 16, len(msg)) if len(msg) >= 16 else None


def test_kernel_shaped_messages_decode_alike():
    rnd = random.Random(5)
    msgs = [random_entry(rnd) for _ in range(3000)]
    decoder = C.Decoder()
    for msg in msgs + msgs:  # the second pass goes through the Python decoder's learned layouts
        want = reference(msg)
        assert want is not None
        assert ctnl.decode(msg, C.CtEntry) == want
        assert decoder.entry(msg, 16, len(msg)) == want
    nat = C.decode_entry(message(entry_attrs(dst="203.0.113.77", reply_src="203.0.113.10")), 16)
    assert ctnl.decode(message(entry_attrs(dst="203.0.113.77", reply_src="203.0.113.10")), C.CtEntry) == nat
    assert (nat.dst, nat.nat_dst, nat.nat_src) == ("203.0.113.77", "203.0.113.10", None)


def test_damaged_messages_decode_alike_and_never_crash():
    rnd = random.Random(9)
    for _ in range(20000):
        msg = damage(random_entry(rnd), rnd)
        if rnd.random() < 0.3:
            msg = damage(msg, rnd)
        got = ctnl.decode(msg, C.CtEntry)
        assert got == reference(msg), msg.hex()
        if got is not None:
            assert type(got) is C.CtEntry and got.flow(0.0).dst == got.dst


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=0, max_size=300), st.integers(0, 2**32 - 1))
def test_any_bytes_decode_alike(tail, seed):
    base = random_entry(random.Random(seed))
    for msg in (base[:16] + tail, base[: len(base) // 2] + tail, tail):
        assert ctnl.decode(msg, C.CtEntry) == reference(msg)


def test_entries_are_ctentry_with_every_field():
    body = entry_attrs("2001:db8:1::5", 5353, "2001:db8:77::1", 443, 17, 0xFFFFFFFF, 2**64 - 1, 2**63, 12345)
    e = ctnl.decode(message(body, family=10), C.CtEntry)
    assert e == C.CtEntry(0xFFFFFFFF, 17, "2001:db8:1::5", 5353, "2001:db8:77::1", 443, 2**64 - 1, 2**63, 12345,
                          None, None)
    assert e[:6] == (0xFFFFFFFF, 17, "2001:db8:1::5", 5353, "2001:db8:77::1", 443) and e.bytes == 2**63
    with pytest.raises(TypeError):
        ctnl.decode(message(body), dict)
    import gc

    assert not gc.is_tracked(e)  # atoms only: left out of the cyclic collector's young walks from the start


class _Sock:
    """The event socket end of a datagram socket pair, for a Conntrack that opened no netlink socket."""

    @staticmethod
    def conntrack(sock) -> C.Conntrack:
        ct = object.__new__(C.Conntrack)
        ct.ev, ct.buf, ct.decoder = sock, bytearray(1 << 20), C.Decoder()
        ct.overflows = ct.errors = ct.dumps = ct._last_drain = ct.skipped_new = 0
        ct.needs_dump = False
        return ct


def _drained(datagrams: list[bytes], use_c: bool) -> list:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        for d in datagrams:
            a.send(d)
        ct = _Sock.conntrack(b)
        old, C.DRAIN["c"] = C.DRAIN["c"], use_c
        try:
            out = []
            while True:
                got = list(ct.events(0.05))
                if not got:
                    return out
                out.extend(got)
        finally:
            C.DRAIN["c"] = old
    finally:
        a.close()
        b.close()


def test_drain_equals_the_python_event_loop():
    rnd = random.Random(3)
    datagrams = []
    for i in range(1500):  # more than one drain's worth (MAX_DATAGRAMS), several messages per datagram
        msgs = [random_entry(rnd) for _ in range(rnd.choice((1, 1, 1, 2, 5)))]
        if i % 7 == 0:
            msgs.append(damage(random_entry(rnd), rnd))
        if i % 11 == 0:  # not events: an update, a DONE, an error, another subsystem's type
            msgs += [message(entry_attrs(), kind=NEW, flags=0), message(b"", mtype=3),
                     struct.pack("=IHHIIi", 20, 2, 0, 0, 0, -1), message(entry_attrs(), mtype=(2 << 8) | DELETE)]
        datagrams.append(b"".join(m + b"\0" * (-len(m) % 4) for m in msgs))
    c, py = _drained(datagrams, True), _drained(datagrams, False)
    assert len(c) > 1500 and c == py
    assert {k for k, _, _ in c} == {"new", "destroy"}
    assert all(type(e) is C.CtEntry and acc is None for _, e, acc in c)


def test_drain_stops_at_the_limit_and_says_whether_the_socket_is_empty():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        one = message(entry_attrs(), kind=DELETE, flags=0)
        for _ in range(10):
            a.send(one)
        evs, n, status, skipped = ctnl.drain(b.fileno(), 4, C.CtEntry)
        assert (len(evs), n, status, skipped) == (4, 4, 1, 0)
        evs, n, status, skipped = ctnl.drain(b.fileno(), 100, C.CtEntry)
        assert (len(evs), n, status, skipped) == (6, 6, 0, 0)
        assert ctnl.drain(b.fileno(), 100, C.CtEntry) == ([], 0, 0, 0)
        a.send(message(entry_attrs(), kind=NEW, flags=NLM_F_CREATE))
        assert ctnl.drain(b.fileno(), 100, C.CtEntry)[0][0][0] == "new"


def test_drain_reports_an_oversized_datagram_and_a_bad_descriptor():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        a.send(b"\0" * 70000)  # larger than a slot: cut by the kernel, so it cannot be decoded
        with pytest.raises(OSError) as err:
            ctnl.drain(b.fileno(), 10, C.CtEntry)
        assert err.value.errno == 90  # EMSGSIZE
    with pytest.raises(OSError):
        ctnl.drain(-1, 10, C.CtEntry)


def test_address_text_is_inet_ntops():
    """The C reader writes addresses itself (glibc's inet_ntop formats each group with sprintf):
    the same text for IPv4, for IPv6 zero runs of every length and place (the first longest run
    becomes "::", single zero groups stay), and the embedded-IPv4 forms it leaves to inet_ntop."""
    rnd = random.Random(6)
    cases = [bytes(16), bytes(15) + b"\x01", bytes(10) + b"\xff\xff\x01\x02\x03\x04", bytes(12) + b"\x01\x02\x03\x04",
             bytes(8) + b"\x00\x01" + bytes(6), b"\x20\x01\x0d\xb8" + bytes(12), bytes(4), b"\xff" * 4, b"\xff" * 16]
    for _ in range(50000):
        words = [rnd.choice((0, 0, 0, rnd.getrandbits(16), rnd.getrandbits(4), rnd.getrandbits(8))) for _ in range(8)]
        cases += [b"".join(w.to_bytes(2, "big") for w in words), rnd.getrandbits(32).to_bytes(4, "big")]
    for raw in cases:
        assert ctnl.ntop(raw) == socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw), raw.hex()
    with pytest.raises(ValueError):
        ctnl.ntop(b"\x01\x02\x03")


SCOPER_ARGS = {"public_nets": ["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "2001::/40"],
               "local_nets": ["192.0.2.0/24", "2001:db8:1::/64", "64:ff9b:1:7::/64"]}


def _boundaries(scoper, version):
    bits = 32 if version == 4 else 128
    for start in scoper._starts[version]:
        for n in (start - 1, start, start + 1):
            if 0 <= n < 1 << bits:
                yield n.to_bytes(bits // 8, "big")


def test_c_classification_equals_scopers():
    """The C reader's scope table answers as Scoper.classify (public, accountable) at every
    boundary of both tables, inside Teredo and local-use NAT64 (resolved through the IPv4 table)
    and on random addresses, with deployment overrides in the tables."""
    from agent.enrich.scope import Scoper

    scoper = Scoper(**SCOPER_ARGS)
    table = C.scope_table(scoper)
    rnd = random.Random(4)
    addrs = list(_boundaries(scoper, 4)) + list(_boundaries(scoper, 6))
    for _ in range(20000):
        addrs.append(rnd.getrandbits(32).to_bytes(4, "big"))
        addrs.append((rnd.getrandbits(128) >> rnd.choice((0, 16, 64, 96))).to_bytes(16, "big"))
    embedded = [b"\x20\x01\x00\x00" + rnd.getrandbits(96).to_bytes(12, "big") for _ in range(2000)]
    embedded += [bytes.fromhex("0064ff9b0001") + rnd.getrandbits(80).to_bytes(10, "big") for _ in range(2000)]
    embedded += [b"\x20\x01\x00\x00" + bytes(8) + (~n & 0xFFFFFFFF).to_bytes(4, "big")
                 for n in (0xC6336407, 0xC0000201, 0x08080808)]  # Teredo clients in public/local/other space
    for raw in addrs + embedded:
        text = socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
        scope, acct = scoper.classify(text)
        assert ctnl.classify(table, raw) == (scope == "public", acct), text
    assert {ctnl.classify(table, r)[1] for r in embedded} == {True, False}  # 2001::/40 is declared public


def test_drain_with_a_scope_table_keeps_the_egress_flows_the_python_loop_keeps():
    from agent.enrich.scope import Scoper

    scoper = Scoper(**SCOPER_ARGS)
    rnd = random.Random(12)
    hosts = ["192.0.2.10", "198.51.100.7", "203.0.113.9", "10.1.2.3", "8.8.8.8", "2001:db8:1::5", "2001:db8:77::1",
             "2001:0:4136:e378:8000:63bf:3fff:fdd2", "64:ff9b:1:7::c633:6407", "64:ff9b::c633:6407", "fe80::1"]
    datagrams, want = [], []
    for _ in range(3000):
        src, dst = rnd.choice(hosts), rnd.choice(hosts)
        if (":" in src) != (":" in dst):
            continue
        kind = rnd.choice((NEW, DELETE))
        msg = message(entry_attrs(src=src, dst=dst, ct_id=rnd.getrandbits(32)), kind=kind,
                      flags=NLM_F_CREATE if kind == NEW else 0, family=10 if ":" in src else 2)
        datagrams.append(msg)
        (d_scope, d_acct), (s_scope, s_acct) = scoper.classify(dst), scoper.classify(src)
        if kind == DELETE:
            want.append(("destroy", None))
        elif d_scope == "public" and s_scope != "public":
            want.append(("new", s_acct and d_acct))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        for d in datagrams:
            a.send(d)
        got, skipped = [], 0
        table = C.scope_table(scoper)
        while True:
            evs, n, _status, sk = ctnl.drain(b.fileno(), 64, C.CtEntry, table)
            if not n:
                break
            got += [(k, acc) for k, _e, acc in evs]
            skipped += sk
    assert got == want
    assert skipped == len(datagrams) - len(want) > 100
    assert {acc for k, acc in want if k == "new"} == {True, False}


@pytest.mark.parametrize("args", [
    ([0], b"\0", ["x"], b"\0"), ([0], b"\0", [-1], b"\0"), ([0], b"\0", [1 << 129], b"\0"), ([], b"", [0], b"\0"),
    ([0], b"\0\0", [0], b"\0"), ([1], b"\0", [0], b"\0"), ([0, 5, 5], b"\0\0\0", [0], b"\0"),
    ([0], b"\0", [0, 1 << 64, 1 << 63], b"\0\0\0"), ([2**33], b"\0", [0], b"\0"),
])
def test_a_malformed_scope_table_is_refused(args):
    with pytest.raises((TypeError, ValueError, OverflowError)):
        ctnl.scope_table(*args)
