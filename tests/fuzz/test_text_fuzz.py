"""Fuzzing the text inputs: JSON lines, policies, policy tests and the daemon config.

The property for all of them: the loader returns, or raises UserError whose message names the
file; never another exception, never a hang (hypothesis' deadline is off, but every example is
small and the loaders are bounded). Short budget by default; `FUZZ_EXAMPLES=20000` for the long run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies
from agent.sources.flowlog.jsonl import read_jsonl

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "policies").glob("*.yaml"))
POLICIES = [p for p in SHIPPED if not p.name.endswith(".test.yaml")]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["tcp", "udp", "²", "6", "1e300", "2024-02-30",
                                                           "10.0.0.5", "203.0.113.9", "::1", "NaN"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)
FIELDS = ["proto", "src", "dst", "sport", "dport", "packets", "bytes", "first_seen", "last_seen", "process",
          "hostname", "source", "conntrack_id", "flow"]


def _raw_json(obj) -> str:
    return json.dumps(obj, allow_nan=True)


@st.composite
def jsonl_lines(draw):
    base = {"proto": "tcp", "src": "10.0.0.5", "dst": "203.0.113.9", "dport": 443}
    for k in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        base[k] = draw(values)
    line = _raw_json(base)
    if draw(st.booleans()):  # then damage the text itself
        i = draw(st.integers(0, len(line)))
        line = line[:i] + draw(st.sampled_from(["", "{", "[" * 50, "9" * 40, "\x00", "\ud800", "NaN", '"'])) + line[i:]
    return line


@SETTINGS
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=4), newline=st.booleans())
def test_jsonl_never_crashes(tmp_path_factory, lines, newline):
    p = tmp_path_factory.mktemp("j") / "f.jsonl"
    p.write_bytes(("\n".join(lines) + ("\n" if newline else "")).encode("utf-8", "surrogatepass"))
    try:
        read_jsonl(str(p))
    except UserError as e:
        assert str(p) in str(e)


def _mutate_yaml(text: str, draw) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        op = draw(st.integers(0, 5))
        if op == 0 and lines:
            lines[i] = lines[i] + draw(st.sampled_from([" &a [*a]", " 2099-02-30", " " + "9" * 50, " [[[[", " *x",
                                                        ": {", " !!python/object:os.system", "\t"]))
        elif op == 1 and lines:
            lines.insert(i, lines[i])  # duplicate keys
        elif op == 2 and lines:
            del lines[i]
        elif op == 3:
            lines.insert(i, draw(st.text(max_size=30)))
        elif op == 4 and lines:
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip()
        else:
            lines.append("x: " + "[" * draw(st.integers(1, 200)))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def jur():
    return Jurisdictions.load()


@SETTINGS
@given(data=st.data())
def test_policies_never_crash(tmp_path_factory, jur, data):
    src = data.draw(st.sampled_from(POLICIES))
    d = tmp_path_factory.mktemp("p")
    p = d / "p.yaml"
    p.write_text(_mutate_yaml(src.read_text(), data.draw), errors="surrogatepass")
    try:
        load_policies(d, jur)
    except UserError as e:
        assert re.search(re.escape(str(p)) + r"|no policy files", str(e)), str(e)


CONFIG = """policies: /etc/egress-agent/policies
geoip_databases: [/var/lib/GeoIP/GeoLite2-City.mmdb]
listen: 127.0.0.1:9807
evidence: {path: /var/lib/egress-agent/evidence.jsonl, max_bytes: 104857600, backups: 10}
source: {type: conntrack, enable: false}
sampling: {one_in: 1, per_destination_per_second: 0}
queue_size: 65536
"""


@SETTINGS
@given(data=st.data())
def test_config_never_crashes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("c") / "agent.yaml"
    p.write_text(_mutate_yaml(CONFIG, data.draw), errors="surrogatepass")
    try:
        load_config(str(p))
    except UserError as e:
        assert str(p) in str(e) or "config" in str(e)


PLAUSIBLE = {  # values near the plain log's shape, a few of each field not acceptable
    "proto": ["tcp", "udp", "TCP", "Udp", "6", 6, 17, 300, True, None],
    "src": ["10.0.0.5", "10.0.0.6", "fd00::5", "::ffff:10.0.0.5", "0:0::1", "1.2.3", 5],
    "dst": ["203.0.113.9", "2001:db8::1", "2001:DB8:0::1", "198.51.100.7", "::1", "x"],
    "sport": [0, 443, 65535, 65536, -1, True, None, "80", 1.5],
    "dport": [443, 53, 8443, None],
    "packets": [None, 0, 1, 2**63 - 1, 2**63, -5, 1.0],
    "bytes": [None, 0, 1500, 2**63 - 1, -1],
    "first_seen": ["2025-06-15T12:00:00Z", "2025-06-15T12:00:00.123456Z", "2025-06-15T12:00:00.5Z",
                   "2025-02-30T00:00:00Z", "2025-06-15T12:00:00+02:00", "2025-06-15 12:00:00", 1750000000,
                   1750000000.25, -1, 1e20, None, True, "9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z"],
    "last_seen": ["2025-06-15T12:00:01Z", 1750000001, None, "x"],
    "hostname": [None, "a.example", "Bücher.example", "xn--bcher-kva.example", "", 5, "a..b", "*.x"],
    "hostname_source": [None, "sni", 5],
    "hostname_chain": [None, ["a.example", "b.example"], "a", [1]],
    "source": [None, "pcap", 5],
}


@st.composite
def plain_lines(draw):
    keys = ["proto", "src", "dst"] + draw(st.lists(st.sampled_from(sorted(set(PLAUSIBLE) - {"proto", "src", "dst"})),
                                                   max_size=8, unique=True))
    obj = {k: draw(st.sampled_from(PLAUSIBLE[k][:3] if draw(st.integers(0, 9)) else PLAUSIBLE[k])) for k in keys}
    return _raw_json(obj)


@SETTINGS
@given(lines=st.lists(st.one_of(plain_lines(), plain_lines(), jsonl_lines()), min_size=1, max_size=6),
       newline=st.booleans(), evidence=st.booleans())
def test_bulk_jsonl_reader_agrees_with_the_line_reader(tmp_path_factory, lines, newline, evidence):
    """The bulk reader never accepts a file the line reader refuses, and when it reads one, it reads
    what the line reader reads (flows, counts, warnings)."""
    from agent.sources.flowlog.table import read_jsonl_table

    if evidence:  # the same lines as evidence records (bodies that are not objects stay as they are)
        lines = [f'{{"event": "new", "conntrack_id": {i % 3}, "flow": {x}}}' for i, x in enumerate(lines)]
    p = tmp_path_factory.mktemp("jb") / "f.jsonl"
    p.write_bytes(("\n".join(lines) + ("\n" if newline else "")).encode("utf-8", "surrogatepass"))
    try:
        want = read_jsonl(str(p))
    except UserError:
        want = None
    got = read_jsonl_table(str(p))
    if got is None:
        return
    assert want is not None, "the bulk reader accepted what the line reader refuses"
    assert got[0].flows() == want[0]
    assert got[1].to_json() == want[1].to_json()
