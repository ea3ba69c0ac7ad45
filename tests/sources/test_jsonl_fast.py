"""The fast JSON-lines paths give what the reference paths give (acceptance, values, spelling)."""

import ipaddress
import json
import random

import pytest

from agent.sources.flowlog.jsonl import canonical_ip, loads, strict_loads


def _reference(v):
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        return ValueError


def test_canonical_ip_equals_ipaddress():
    rnd = random.Random(9)
    cases = ["01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "::1.2.3.4", "::", "::1", "fe80::1%eth0", "FE80::A",
             "1:0:0:2::", "2001:db8::1.2.3.4", " 1.2.3.4", "1.2.3.256", "", "x", "1::2::3"]
    for _ in range(3000):
        n = rnd.getrandbits(128) >> rnd.choice((0, 16, 48, 80, 96, 112))
        cases += [str(ipaddress.IPv6Address(n)), ipaddress.IPv6Address(n).exploded.upper(),
                  str(ipaddress.IPv4Address(n & 0xFFFFFFFF))]
    for v in cases:
        want = _reference(v)
        if want is ValueError:
            with pytest.raises(ValueError):
                canonical_ip(v)
        else:
            assert canonical_ip(v) == want, v


def test_address_words_equal_canonical_ip_and_ip_int():
    from agent.enrich.scope import ip_int
    from agent.sources.flowlog.table import _words

    rnd = random.Random(4)
    cases = ["01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "::1.2.3.4", "::", "::1", "fe80::1%eth0", "FE80::A",
             "1:0:0:2::", "2001:db8::1.2.3.4", " 1.2.3.4", "1.2.3.256", "", "x", "1::2::3", "0.0.0.0",
             "255.255.255.255", "::ffff:0:0", "0:0:0:0:0:1:0:0"]
    for _ in range(3000):
        n = rnd.getrandbits(128) >> rnd.choice((0, 16, 48, 80, 96, 112))
        cases += [str(ipaddress.IPv6Address(n)), ipaddress.IPv6Address(n).exploded.upper(),
                  str(ipaddress.IPv4Address(n & 0xFFFFFFFF))]
    for v in cases:
        try:  # what _words did before its fast path
            c = canonical_ip(v)
            version, n = ip_int(c)
        except ValueError:
            with pytest.raises(ValueError):
                _words(v)
            continue
        assert _words(v) == (c, (version == 4, n >> 64, n & (2**64 - 1))), v


@pytest.mark.parametrize("raw", [
    b'{"a": 1, "b": [1.5, -2, "x\\u00e9"], "c": null, "d": true}', b'{"a": 1, "a": 2}', b'[18446744073709551615]',
    b'{"n": 123456789012345678901}', b'[1e999]', b'{"t": NaN}', b'[Infinity]', b'"\\ud800"', b'[' * 3000 + b']' * 3000,
    b'{"x": "\xff"}', b'{"k": 1} trailing', b'', b'  {"sp": 1}  \n',
])
def test_loads_equals_strict_loads(raw):
    def outcome(fn):
        try:
            return ("ok", fn(raw))
        except RecursionError:
            return ("recursion", None)
        except ValueError as e:
            return ("error", type(e).__name__ if not isinstance(e, UnicodeDecodeError) else "unicode")

    a, b = outcome(loads), outcome(strict_loads)
    assert a[0] == b[0] and (a[0] != "ok" or a[1] == b[1]), (a, b)


# -- the bulk reader (sources/flowlog/table.py) against the line reader ------------------------------

def _write(tmp_path, lines, name="f.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join(lines))
    return str(p)


@pytest.fixture(params=[1 << 16, 37], ids=["one-chunk", "small-chunks"])
def chunk(request, monkeypatch):
    from agent.sources.flowlog import table as jsonl_table

    monkeypatch.setattr(jsonl_table, "CHUNK_LINES", request.param)
    return request.param


def test_bulk_reader_equals_line_reader_on_random_logs(tmp_path, chunk):
    import json as _json

    from agent.sources.flowlog.jsonl import read_jsonl
    from agent.sources.flowlog.table import read_jsonl_table
    from tests.test_bulk import random_flows

    flows = [f for f in random_flows(2000, 21) if f.who is None]
    lines = [(_json.dumps(f.to_json()) + "\n").encode() for f in flows]
    rnd = random.Random(5)
    for i in rnd.sample(range(len(lines)), 200):  # other spellings both readers accept
        d = _json.loads(lines[i])
        d["proto"] = d["proto"].upper() if rnd.random() < 0.5 else {"tcp": 6, "udp": 17}.get(d["proto"], 1)
        d["first_seen"] = flows[i].first_seen
        d.pop("last_seen")
        d.pop("sport", None)
        d["src"] = ipaddress.ip_address(d["src"]).exploded
        lines[i] = (_json.dumps(d) + "\n").encode()
    path = _write(tmp_path, lines)
    got = read_jsonl_table(path)
    assert got is not None
    assert got[0].flows() == read_jsonl(path)[0]
    assert got[1].to_json() == read_jsonl(path)[1].to_json()


@pytest.mark.parametrize("line", [
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "flow": {}}\n',  # evidence record
    b'{"event": "gap", "reason": "write-failed"}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "process": {"pid": 1}}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "first_seen": "2025-02-30T00:00:00Z"}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "first_seen": "2025-06-01T00:00:00+02:00"}\n',
    # a valid time with more text after it
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "first_seen": "2025-06-01T00:00:00.000001Zjunk"}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "bytes": 1e3}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "x": 123456789012345678901234}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "not-an-address"}\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1", "sport": true}\n',
    b'\n',
    b'{"proto": "tcp", "src": "10.0.0.1", "dst": "198.51.100.1"}',  # no final newline: truncation
])
def test_bulk_reader_leaves_anything_else_to_the_line_reader(tmp_path, line):
    from agent.sources.flowlog.table import read_jsonl_table

    ok = b'{"proto": "udp", "src": "10.0.0.2", "dst": "203.0.113.5", "first_seen": "2025-06-01T00:00:00Z"}\n'
    assert read_jsonl_table(_write(tmp_path, [ok, line])) is None
    assert read_jsonl_table(_write(tmp_path, [ok, ok], "good.jsonl")) is not None


def test_bulk_reader_merges_an_evidence_log_as_the_line_reader_does(tmp_path, chunk):
    import dataclasses
    import json as _json

    from agent.sources.flowlog.jsonl import read_jsonl
    from agent.sources.flowlog.table import read_jsonl_table
    from tests.test_bulk import random_flows

    rnd = random.Random(8)
    flows = [f for f in random_flows(600, 31) if f.who is None]
    lines = []
    for i, f in enumerate(flows):
        ct = i % 400 if i % 3 else None  # ids repeat (32-bit ids collide): the tuple tells them apart
        for event in ("new", "new", "end"):  # one line per reported verdict, then the end with counters
            g = dataclasses.replace(f, bytes=f.bytes + (rnd.randrange(2) * 1000 if event == "end" else 0))
            rec = {"time": "2025-06-15T12:00:00Z", "event": event, "policy": "p", "flow": g.to_json(), "seq": i}
            if ct is not None:
                rec["conntrack_id"] = ct
            lines.append(rec)
        if i == 100:
            lines.append({"time": "2025-06-15T12:00:01Z", "event": "gap", "reason": "write-failed", "lost_lines": 3,
                          "from": "a", "until": "b", "message": "3 evidence record(s) could not be written"})
    rnd.shuffle(lines)  # which line wins depends on the order: both readers must agree on any order
    lines.append({"time": "2025-06-15T13:00:00Z", "event": "stop"})
    for k, rec in enumerate(lines):  # numbered as the agent numbers them: one more per record
        rec["seq"] = k + 1
    path = _write(tmp_path, [(_json.dumps(r) + "\n").encode() for r in lines])
    got = read_jsonl_table(path)
    assert got is not None
    want = read_jsonl(path)
    assert got[0].flows() == want[0]
    assert got[1].to_json() == want[1].to_json()
    assert len(want[0]) < len(flows) * 3 and want[1].warnings


@pytest.mark.parametrize("extra", [', "conntrack_id": -1', ', "conntrack_id": 4294967296', ', "conntrack_id": true',
                                   ', "conntrack_id": "7"'])
def test_bulk_reader_leaves_bad_conntrack_ids_to_the_line_reader(tmp_path, extra):
    from agent.sources.flowlog.table import read_jsonl_table

    flow = '{"proto": "udp", "src": "10.0.0.2", "dst": "203.0.113.5", "first_seen": "2025-06-01T00:00:00Z"}'
    good = f'{{"event": "new", "flow": {flow}, "conntrack_id": 5}}\n'.encode()
    bad = f'{{"event": "new", "flow": {flow}{extra}}}\n'.encode()
    assert read_jsonl_table(_write(tmp_path, [good, good], "ok.jsonl")) is not None
    assert read_jsonl_table(_write(tmp_path, [good, bad])) is None


# The C column reader (agent.sources.flowlog._flowlog) against the Python bulk reader it stands in for.

_C_VALUES = {
    "proto": ["tcp", "udp", "TCP", "icmp", "sctp", 6, 17, 255, 256, "6", "", None, True, 1.0, -6],
    "src": ["10.0.0.5", "fd00::5", "::ffff:10.0.0.5", "::1.2.3.4", "0:0::1", "FE80::A", "fe80::1%eth0",
            "2001:0db8:0000::1", "1.2.3", "01.2.3.4", "", None, 5],
    "dst": ["203.0.113.9", "2001:db8::1", "198.51.100.7", "::", "2001:db8::1.2.3.4", "x"],
    "sport": [0, 443, 65535, 65536, None, -1, True, "80", 1.5, 10**19],
    "dport": [443, 53, 0, None, 100000],
    "packets": [None, 0, 1, 2**63 - 1, 2**63, 18446744073709551615],
    "bytes": [None, 0, 1500, 2**63 - 1, 2**64],
    "first_seen": ["2025-06-15T12:00:00Z", "2025-06-15T12:00:00.123456Z", 1750000000.25,
                   "2024-02-29T23:59:59.999999Z", 0, 0.1, 1750000000.123456789, 1.5e9, -1, 253402300799,
                   253402300800.5, 12345678901234567890123456789012345678901.5, 1750000000.0,
                   "2025-02-29T00:00:00Z", "2025-06-15T24:00:00Z", "2025-06-15T12:00:60Z", "1969-12-31T23:59:59Z",
                   "1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2025-06-15T12:00:00.5Z",
                   "2025-06-15T12:00:00.123456Zjunk", "2025-06-15t12:00:00Z", 1750000000, None],
    "last_seen": ["2025-06-15T12:00:01Z", "2025-06-15T12:00:01.000001Z", 1750000001.5, None, 1750000001, 1e10],
    "source": [None, "pcap", "", "conntrack", 5],
    "hostname": [None, "api.example", "API.Example.", "b\u00fccher.example", "", "*.x", 5],
    "hostname_source": [None, "sni", "dns", 5],
    "hostname_chain": [None, ["a.example", "b.example"]],
    "other": [None, 1, "x"],
}


def _spelled(obj: dict, draw) -> str:
    """JSON text of a flat object, with the spacing a writer may choose."""
    from hypothesis import strategies as st

    sp = lambda: draw(st.sampled_from(["", "", " ", "  ", "\t"]))  # noqa: E731
    items = [f'{sp()}"{k}"{sp()}:{sp()}{json.dumps(v)}{sp()}' for k, v in obj.items()]
    return "{" + ",".join(items) + "}" + draw(st.sampled_from(["", "", " ", "\r"]))


def _c_vs_python(path):
    from agent.sources.flowlog import table as jsonl_table

    got = jsonl_table.read_jsonl_table(path)
    c = jsonl_table._c_columns
    jsonl_table._c_columns = None
    try:
        want = jsonl_table.read_jsonl_table(path)
    finally:
        jsonl_table._c_columns = c
    if want is None:
        assert got is None, "the C reader accepted a log the Python reader refuses"
        return None
    assert got is not None, "the C reader sent away a log the Python reader reads"
    assert got[0].flows() == want[0].flows()
    assert got[1].to_json() == want[1].to_json()
    assert [a.text for a in (got[0].src, got[0].dst)] == [a.text for a in (want[0].src, want[0].dst)]
    return got


def test_c_columns_read_the_usual_log(tmp_path):
    """The tool's own flow log, compact or spaced, is read by the C reader, not sent away."""
    from agent.sources.flowlog import table as jsonl_table
    from tests.test_bulk import random_flows

    if jsonl_table._c_columns is None:
        pytest.skip("the C module is not built")
    flows = [f for f in random_flows(3000, 23) if f.who is None and (f.hostname or "").isascii()]
    for sep in ((",", ":"), (", ", ": ")):
        text = "".join(json.dumps(f.to_json(), separators=sep) + "\n" for f in flows)
        path = tmp_path / f"log{len(sep[1])}.jsonl"
        path.write_text(text)
        assert jsonl_table._c_columns(text.encode(), jsonl_table.MAX_LINE) is not None
        assert _c_vs_python(str(path)) is not None


def test_c_columns_read_numeric_times(tmp_path):
    """POSIX seconds (integers and decimals, as flow exporters write them) stay on the C reader, with
    the values float() gives the same text; a sign or an exponent is sent to the Python reader."""
    from agent.sources.flowlog import table as jsonl_table

    if jsonl_table._c_columns is None:
        pytest.skip("the C module is not built")
    times = ["1750000000", "1750000000.5", "1750000000.123456789", "0.000001", "1750000000.10000000000000001"]
    text = "".join(f'{{"proto": "udp", "src": "10.0.0.2", "dst": "203.0.113.{i + 1}", "first_seen": {t}, '
                   f'"last_seen": {t}}}\n' for i, t in enumerate(times))
    path = tmp_path / "epoch.jsonl"
    path.write_text(text)
    assert jsonl_table._c_columns(text.encode(), jsonl_table.MAX_LINE) is not None
    got = _c_vs_python(str(path))
    assert [f.first_seen for f in got[0].flows()] == [float(t) for t in times]
    for odd in ("1.75e9", "-1", "01750000000"):
        assert jsonl_table._c_columns(text.replace(times[0], odd, 1).encode(), jsonl_table.MAX_LINE) is None


def test_c_columns_equal_the_python_reader_on_varied_logs(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agent.sources.flowlog import table as jsonl_table

    if jsonl_table._c_columns is None:
        pytest.skip("the C module is not built")

    @st.composite
    def logs(draw):
        lines = []
        for _ in range(draw(st.integers(1, 5))):
            keys = ["proto", "src", "dst"] + draw(st.lists(st.sampled_from(sorted(set(_C_VALUES) - {"proto", "src",
                                                                                                      "dst"})),
                                                             max_size=10, unique=True))
            keys = draw(st.permutations(keys))
            common = draw(st.integers(0, 9)) > 0  # mostly values the C reader takes
            obj = {k: draw(st.sampled_from(_C_VALUES[k][:3] if common else _C_VALUES[k])) for k in keys}
            line = _spelled(obj, draw)
            if draw(st.integers(0, 9)) == 0:  # a damaged byte
                i = draw(st.integers(0, len(line) - 1))
                line = line[:i] + draw(st.sampled_from(['"', "\\", "{", "}", ",", ":", "\x01", "\u00e9", " "])) + \
                    line[i + 1:]
            lines.append(line)
        return "\n".join(lines) + "\n"

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=logs())
    def check(text):
        p = tmp_path_factory.mktemp("cj") / "f.jsonl"
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        _c_vs_python(str(p))

    check()
