"""The collector's connection table: the C twin (`_conntab`) answers every operation as the
reference (`conntable.ConnTable`) does, on generated streams (tests/fuzz/conntable_streams.py):
the same items in the same order, the same tallies, sizes and connection ids."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sources.netflow import conntable
from tests.fuzz.conntable_streams import SCOPERS, first_difference, record, run, stream

needs_c = pytest.mark.skipif(conntable._conntab is None, reason="the C connection table is not built")


@needs_c
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 40), max_connections=st.sampled_from([1, 2, 3, 8, 1000]),
       inbound=st.booleans())
def test_c_table_equals_reference(seed, n, max_connections, inbound):
    ops = stream(random.Random(seed), n)
    assert first_difference(ops, max_connections, inbound) is None


@needs_c
def test_a_long_stream_with_the_default_bound():
    ops = stream(random.Random(5), 1500)
    assert first_difference(ops, conntable.MAX_CONNECTIONS, True) is None


@pytest.mark.parametrize("c", [True, False] if conntable._conntab is not None else [False])
def test_a_reply_in_the_same_round_is_one_judged_connection(c):
    """The reference's own behaviour, which the twin copies: a record and its reply in one round
    are one connection, judged once, oriented by the port rule, with both directions' counters."""
    from agent.sources.netflow.decode import Record

    t = conntable.make_table("netflow", SCOPERS, False, 100, c)
    out = Record(6, "192.0.2.1", 40000, "203.0.113.5", 443, 3, 300, 10.0, 11.0, 0x18, "192.0.2.254", None, None, 1, 2)
    back = Record(6, "203.0.113.5", 443, "192.0.2.1", 40000, 2, 5000, 9.5, 11.5, 0x18, "192.0.2.254", None, None, 2, 1)
    items: list = []
    tally = t.feed([([back, out], "edge", 0)], items)
    assert tally == {("records", "edge", "connection"): 1, ("records", "edge", "merged"): 1, ("new",): 1}
    ((kind, e, counted),) = items
    assert (kind, counted, e.ct_id, e.opened_by) == ("flow", True, 101, "port")
    assert (e.src, e.sport, e.dst, e.dport) == ("192.0.2.1", 40000, "203.0.113.5", 443)
    assert (e.packets, e.bytes, e.packets_reply, e.bytes_reply, e.start_ns) == (3, 300, 2, 5000, 9_500_000_000)
    assert (e.dst_vn, e.src_vn, e.inbound) == ((4, 0xCB007105), (4, 0xC0000201), False)
    if c:  # what can hold no cycle is left out of the cyclic collector's walks from the start
        import gc

        assert not any(gc.is_tracked(x) for x in (items[0], e, e.dst_vn, e.src_vn))
    assert len(t) == 1
    items = []
    assert t.sweep(11.5 + 359, items) == {} and len(t) == 1  # TCP: 300 s idle + 60 s grace
    assert t.sweep(11.5 + 361, items) == {} and [k for k, _e, _c in items] == ["destroy"] and len(t) == 0


def test_records_fields_the_twin_reads_by_position():
    """The C twin reads decode.Record by index: its field order is part of the contract."""
    from agent.sources.netflow.decode import Record

    assert Record._fields[:18] == ("proto", "src", "sport", "dst", "dport", "packets", "bytes", "first", "last",
                                   "tcp_flags", "exporter", "sampled", "direction", "in_if", "out_if",
                                   "packets_reply", "bytes_reply", "tcp_flags_reply")
    assert run(conntable.make_table("netflow", SCOPERS, True, 0, False), [("feed", [([record(random.Random(1), 0.0)],
                                                                                     "edge", -1)])])[0][0] == {
        ("records", "edge", "refused"): 1}


@needs_c
def test_a_call_from_inside_a_call_is_refused_and_the_table_lives_on():
    """Python code the twin runs (an address's own __eq__, a finalizer) cannot enter it mid-call."""
    from agent.sources.netflow.decode import Record

    t = conntable.make_table("netflow", SCOPERS, False, 0)

    class Reentrant(str):
        def __eq__(self, other):
            return t.feed([], [])

        __hash__ = str.__hash__

    def rec(src):
        return Record(17, src, 5353, "203.0.113.5", 53, 1, 80, 10.0, 10.0, 0, "192.0.2.254", None, None, None, None)

    with pytest.raises(RuntimeError, match="from inside another"):
        t.feed([([rec(Reentrant("192.0.2.1")), rec(Reentrant("192.0.2.1"))], "edge", 0)], [])
    items: list = []
    assert t.feed([([rec("192.0.2.9")], "edge", 0)], items) == {("records", "edge", "connection"): 1, ("new",): 1}
    assert len(items) == 1 and len(t) == 2
