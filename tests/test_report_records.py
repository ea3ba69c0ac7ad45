"""agent.sinks.records against its reference: each record's JSON text is what orjson makes of its
dict, byte for byte, and the numeric sort orders records as Python's sort of the dicts does.

The report tests (tests/test_bulk.py) reach these through whole audits; here the strings are
hostile (quotes, backslashes, control and separator characters, non-ASCII) and times tie often.
"""

from __future__ import annotations

from operator import itemgetter
from types import SimpleNamespace

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.flow import iso_parts, iso_times
from agent.policy.engine import peer_prefix
from agent.sinks.records import IsoColumn, RecordBlock, sort_order

TEXT = st.text(alphabet=st.sampled_from(['a', '"', '\\', '\n', '\x00', '\x7f', '\u2028', '\u00e9', '\u2603', ' ',
                                         '(', '.', '1']), max_size=6)
MAYBE = st.one_of(st.none(), TEXT)
ADDR = st.sampled_from(["198.51.100.7", "203.0.113.9", "2001:db8::1", "198.51.100.70", '2001:db8::"x'])
TIMES = st.sampled_from([1750000000.0, 1750000000.5, 1750000001.0, 1750000000.0000004, 1750000123.25, 0.0,
                         1750000000.9999996])


@st.composite
def blocks(draw):
    n_groups = draw(st.integers(1, 3))
    per_group, loc = [], []
    for _ in range(n_groups):
        verdicts = []
        for _ in range(draw(st.integers(0, 2))):
            peer = draw(ADDR)
            prefix = peer_prefix(peer, False, draw(st.one_of(st.none(), st.just("api.example"))), "sni")
            mode = draw(st.integers(0, 2))
            rest = draw(TEXT)
            message = (prefix + rest, f"destination {peer} " + rest, "no peer here " + rest)[mode]
            v = SimpleNamespace(policy=draw(st.sampled_from(["b-pol", "a-pol", 'q"pol'])), severity=draw(TEXT),
                                reason=draw(TEXT), message=message, exception=draw(MAYBE))
            verdicts.append((v, (peer, prefix)))
        per_group.append(verdicts)
        loc.append((draw(MAYBE), draw(MAYBE), draw(st.one_of(st.none(), st.integers(0, 2**32))), draw(MAYBE),
                    draw(MAYBE)))
    n = draw(st.integers(0, 8))
    groups = [draw(st.integers(0, n_groups - 1)) for _ in range(n)]
    dst = [draw(ADDR) for _ in range(n)]
    host = [draw(st.one_of(st.none(), st.just("api.example"), TEXT)) for _ in range(n)]
    hsrc = [draw(st.one_of(st.none(), st.just("sni"), TEXT)) for _ in range(n)]
    first = np.array([draw(TIMES) for _ in range(n)], dtype=np.float64)
    parts = iso_parts(first)
    ints = lambda lo, hi: [draw(st.integers(lo, hi)) for _ in range(n)]  # noqa: E731
    process = [draw(st.one_of(st.none(), st.just({"pid": 7, "comm": 'c"u'}))) for _ in range(n)]
    cols = (groups, [draw(ADDR) for _ in range(n)], ints(0, 65535), dst,
            [draw(st.sampled_from([443, 53])) for _ in range(n)],
            [draw(st.sampled_from(["tcp", "udp"])) for _ in range(n)], ints(0, 2**40), ints(0, 2**62),
            *((IsoColumn.of(first, parts), IsoColumn.of(first + 5)) if draw(st.booleans()) else
              (iso_times(first, parts), iso_times(first + 5))), process, host, hsrc,
            [peer_prefix(d, False, h, s) for d, h, s in zip(dst, host, hsrc, strict=True)], ints(0, 2**40),
            ints(0, 2**62), [draw(st.sampled_from([None, "syn", "port", 'x"y'])) for _ in range(n)])
    return RecordBlock(per_group, cols, loc, parts)


@settings(max_examples=150, deadline=None)
@given(blocks())
def test_json_text_is_orjsons_of_the_dict(block):
    dicts = block.dicts()
    assert block.json() == [orjson.dumps(d).decode() for d in dicts]


@settings(max_examples=150, deadline=None)
@given(blocks(), st.data())
def test_the_c_writer_equals_the_python_loop(block, data):
    """agent.sinks._records makes the Python loop's text, for every record and for any selection;
    a count beyond 64 bits (which it refuses) takes the loop."""
    import pytest

    from agent.sinks import records as mod

    if mod._c_json is None:
        pytest.skip("the C module is not built")
    n = len(block.pairs())
    select = data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=6)) if n else []
    got = block.json(), block.json(select)
    assert block.json(select, as_bytes=True) == [t.encode() for t in got[1]]
    joined = block.json(select, joined=True), block.json(joined=True)
    assert joined == (",".join(got[1]).encode(), ",".join(got[0]).encode())
    c, mod._c_json = mod._c_json, None
    try:
        want = block.json(), block.json(select)
        assert joined == (block.json(select, joined=True), block.json(joined=True))
    finally:
        mod._c_json = c
    assert got == want
    if n:
        block.cols[7][block.pairs()[0][0]] = 2**64 + 1
        got = block.json()
        c, mod._c_json = mod._c_json, None
        try:
            assert got == block.json() and f'"bytes":{2**64 + 1},' in got[0]
        finally:
            mod._c_json = c


@settings(max_examples=150, deadline=None)
@given(st.lists(blocks(), max_size=3))
def test_numeric_sort_is_the_dict_sort(bs):
    dicts = [d for b in bs for d in b.dicts()]
    expect = sorted(range(len(dicts)), key=lambda i: itemgetter("policy", "first_seen", "dst", "dst_port")(dicts[i]))
    assert sort_order(bs) == expect


def test_a_dict_among_the_records_leaves_the_sort_to_the_caller():
    assert sort_order([{"policy": "p", "first_seen": None, "dst": "x", "dst_port": 1}]) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 253402300798.0), st.integers(0, 4_000_000_000).map(float),
                          st.sampled_from([0.0, 1e-7, 0.5e-6, 1.5e-6, 0.9999995, 951782400.0, 253402300798.0])),
                max_size=60))
def test_c_iso_texts_equal_iso_times(ts):
    """The C column formatter spells every time as agent.flow.iso_times does (with and without a
    fraction, rounding carries, leap days, the last second of 9999)."""
    import pytest

    from agent.sinks import records as mod

    if mod._c_iso_texts is None:
        pytest.skip("C report writer not built")
    arr = np.array(ts, dtype=np.float64)
    assert mod.iso_texts(arr) == iso_times(arr)
    assert mod.iso_texts(arr, iso_parts(arr)) == iso_times(arr)


def test_times_outside_the_c_range_fall_back_to_numpy():
    from agent.sinks import records as mod

    arr = np.array([1.5, 253402300800.5, -3.25])
    assert mod.iso_texts(arr) == iso_times(arr)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), max_size=30))
def test_quoted_columns_are_each_values_json(col):
    from agent.sinks.records import _quoted

    assert _quoted(col) == [orjson.dumps(x).decode() for x in col]
