"""The bulk judging path (agent.judge.bulk, AuditReport.add_table) against the per-flow path, report for report.

`audit` judges flow-heavy inputs in bulk (`--flows` included: its rows are made from the table's
columns, a chunk at a time); `--html` and inventories take a Judged per flow from the bulk results.
Both must write the same report for the same input, down to the order of records and of equal
byte counts. Every building block is also checked against its scalar twin on its own.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

import numpy as np
import orjson
import pytest

import agent.commands.inputs as inputs_mod
from agent.cli import main
from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper, ip_int
from agent.flow import Flow, Who, iso_time, iso_times
from agent.flowtable import Addresses, FlowTable
from agent.policy.compiled import NetMask
from tests.helpers import build_asn_mmdb, build_city_mmdb
from tests.register_fixtures import payroll, write_setup

T = 1750000000.0

LOCATIONS = {
    "198.51.100.0/25": {"country": "DE", "asn": 24940, "org": "Hetzner Online GmbH"},
    "198.51.100.128/26": {"country": "JP"},
    "198.51.100.192/26": {"anycast": True},
    "203.0.113.0/25": {"country": "US", "asn": 16509, "org": "AMAZON-02"},
    "203.0.113.128/26": {"country": "CN"},
    "203.0.113.192/27": {"registered": "FR"},
    "2001:db8:de::/48": {"country": "DE"},
    "2001:db8:5::/48": {"country": "US"},
    "8.8.8.0/24": {"country": "US", "asn": 15169, "org": "GOOGLE"},
    "1.0.0.0/8": {"country": "CN"},
    "81.0.0.0/8": {"country": "GB"},
    "2a00::/12": {"country": "NL"},
}

POLICY_EXTRA = """\
version: 1
name: bulk-extra
description: inbound, ports, names and sources, so every part of the verdict key is used
home: [EU]
applies_to:
  protocols: [tcp, udp]
  ports: [443, 8443, "1000-2000"]
  sources: ["10.1.0.0/16", "fd00::/8"]
directions: [outbound, inbound]
allow:
  jurisdictions: [EEA]
  hostnames: ["*.allowed.example"]
deny:
  networks: ["203.0.113.128/26"]
unknown: violation
"""


def _addr(rnd: random.Random, public: bool) -> str:
    if public:
        return rnd.choice([
            lambda: f"198.51.100.{rnd.randrange(256)}", lambda: f"203.0.113.{rnd.randrange(256)}",
            lambda: f"8.8.8.{rnd.randrange(256)}", lambda: f"1.{rnd.randrange(256)}.{rnd.randrange(256)}.7",
            lambda: f"81.2.{rnd.randrange(256)}.{rnd.randrange(256)}", lambda: f"2001:db8:de::{rnd.randrange(9999):x}",
            lambda: f"2001:db8:5::{rnd.randrange(99):x}", lambda: f"2a00:{rnd.randrange(65536):x}::1",
            lambda: f"64:ff9b::{rnd.randrange(256)}.{rnd.randrange(256)}.8.8",  # NAT64 (embedded IPv4)
            lambda: "2002:0808:0808::1", lambda: f"9.{rnd.randrange(256)}.0.1",
        ])()
    return rnd.choice([lambda: f"10.1.{rnd.randrange(4)}.{rnd.randrange(256)}", lambda: "10.9.0.1",
                       lambda: "192.168.1.5", lambda: "fd00::5", lambda: "127.0.0.1", lambda: "::1"])()


def random_flows(n: int, seed: int) -> list[Flow]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.75:
            src, dst = _addr(rnd, False), _addr(rnd, True)
        elif kind < 0.85:
            src, dst = _addr(rnd, True), _addr(rnd, False)  # inbound
        elif kind < 0.95:
            src, dst = _addr(rnd, False), _addr(rnd, False)
        else:
            src, dst = _addr(rnd, True), _addr(rnd, True)
        if (":" in src) != (":" in dst):
            dst = "2001:db8:de::1" if ":" in src else "198.51.100.9"
        first = rnd.choice([T + rnd.uniform(-4e7, 1e6), T + rnd.randrange(100), 0.0, 500000000.0, 4e9])
        host = rnd.choice([None, None, "api.allowed.example", "evil.example", "xn--bcher-kva.example",
                           "hr.payroll.example", "b\u00fccher.example"])
        who = rnd.choice([None, None, Who(pid=7, comm="curl", uid=0, user="root")])
        out.append(Flow(proto=rnd.choice([6, 17, 6, 1, 132]), src=src, sport=rnd.randrange(65536), dst=dst,
                        dport=rnd.choice([443, 53, 8443, 1500, 22]), packets=rnd.randrange(1, 50),
                        bytes=rnd.randrange(40, 10**6), first_seen=first,
                        last_seen=first + rnd.uniform(0, 100) if first else 0.0, source="jsonl", who=who,
                        hostname=host, hostname_source="sni" if host else None))
    return out


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bulkgeo")
    return build_city_mmdb(d / "city.mmdb", LOCATIONS), build_asn_mmdb(d / "asn.mmdb", LOCATIONS)


def _report(argv, bulk: bool, monkeypatch, out):
    monkeypatch.setattr(inputs_mod, "BULK", bulk)
    try:
        main([*argv, "--format", "json", "--output", str(out)])
    except SystemExit:
        pass
    raw = out.read_bytes()
    # the bulk path writes records from pre-made JSON text (agent.sinks.records): it must be the
    # bytes orjson makes of the same data, not only the same data
    assert orjson.dumps(orjson.loads(raw), option=orjson.OPT_APPEND_NEWLINE) == raw
    r = json.loads(raw)
    r.pop("generated_at")
    return r


def _both(argv, monkeypatch, tmp_path):
    a = _report(argv, True, monkeypatch, tmp_path / "bulk.json")
    b = _report(argv, False, monkeypatch, tmp_path / "scalar.json")
    return a, b


@pytest.mark.parametrize("seed,flows", [(1, False), (2, False), (3, True)])
def test_flow_log_reports_are_equal_both_ways(tmp_path, monkeypatch, dbs, seed, flows):
    with_flows = flows
    flows = random_flows(3000, seed)
    if with_flows:  # rows of equal sort keys (same first seen and 5-tuple, other counters) keep their order
        flows += [f.__class__(**{**{k: getattr(f, k) for k in f.__slots__}, "bytes": f.bytes + 1})
                  for f in flows[:40]]
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(json.dumps(f.to_json()) + "\n" for f in flows[:2000]))
    log2 = tmp_path / "more.jsonl"  # a second input: a second block of records, merged by the sort
    log2.write_text("".join(json.dumps(f.to_json()) + "\n" for f in flows[2000:]))
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "extra.yaml").write_text(POLICY_EXTRA)
    shipped = Path(__file__).resolve().parent.parent / "policies"
    for p in shipped.glob("*.yaml"):
        if not p.name.endswith(".test.yaml"):
            (pol / p.name).write_text(p.read_text())
    argv = ["audit", "--policies", str(pol), "--geoip-db", dbs[0], "--geoip-db", dbs[1], "--as-of", "2025-07-01",
            "--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32",
            *(["--flows"] if with_flows else []), str(log), str(log2)]
    a, b = _both(argv, monkeypatch, tmp_path)
    assert a == b
    assert a["verdicts"]["violation"] and a["redated"] and a["totals"]["inbound_flows"]
    if with_flows:
        assert len(a["flows"]) == len(flows) and {f["direction"] for f in a["flows"]} == {None, "outbound", "inbound"}
    assert any(v["hostname"] for v in a["violations"]) and any(not v["message"].isascii() for v in a["violations"])


def test_register_rows_go_one_by_one_and_agree(tmp_path, monkeypatch, dbs):
    flows = random_flows(800, 5)
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(json.dumps(f.to_json()) + "\n" for f in flows))
    # a second recipient by network: half of one location's addresses, so the recipient (not the
    # location) must split a group of equal facts
    dns = """  - id: resolver
    name: Example Resolver
    role: processor
    established_in: US
    processing_locations: [US]
    match: {networks: ["8.8.8.0/25"]}
"""
    pol, reg = write_setup(tmp_path, payroll() + dns)
    argv = ["audit", "--policies", str(pol), "--geoip-db", dbs[0], "--as-of", "2025-07-01", "--recipients", str(reg),
            "--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32",
            str(log)]
    a, b = _both(argv, monkeypatch, tmp_path)
    assert a == b


def test_capture_reports_are_equal_both_ways(tmp_path, monkeypatch, dbs):
    from scapy.all import IP, TCP, UDP, Ether, Raw, wrpcap

    rnd = random.Random(9)
    pkts = []
    for i in range(2000):
        f = random_flows(1, i)[0]
        if ":" in f.src or f.proto not in (6, 17):
            continue
        l4 = TCP(sport=f.sport, dport=f.dport) if f.proto == 6 else UDP(sport=f.sport, dport=f.dport)
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=f.src, dst=f.dst) / l4 / Raw(b"x" * 20)
        p.time = T + rnd.uniform(0, 1000)
        pkts += [p] * rnd.randrange(1, 3)
    path = tmp_path / "c.pcap"
    wrpcap(str(path), pkts)
    argv = ["audit", "--geoip-db", dbs[0], "--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24",
            str(path)]
    a, b = _both(argv, monkeypatch, tmp_path)
    assert a == b and a["violations"]


def test_scope_many_equals_scope_at_every_boundary():
    sc = Scoper(public_nets=["198.51.100.0/24", "2001:db8::/32"], local_nets=["100.64.0.0/10"])
    probes = []
    for version in (4, 6):
        for start, end, _ in sc.ranges(version):
            probes += [(version, x) for x in (start, end, start + 1, max(start - 1, 0))]
    rnd = random.Random(3)
    probes += [(4, rnd.getrandbits(32)) for _ in range(3000)] + [(6, rnd.getrandbits(128)) for _ in range(3000)]
    probes += [(6, (0x2001 << 112) | rnd.getrandbits(96)) for _ in range(500)]  # Teredo
    probes += [(6, (0x64FF9B0001 << 80) | rnd.getrandbits(32)) for _ in range(500)]  # local-use NAT64
    v4 = np.array([v == 4 for v, _ in probes])
    hi = np.array([x >> 64 for _, x in probes], dtype=np.uint64)
    lo = np.array([x & (2**64 - 1) for _, x in probes], dtype=np.uint64)
    assert sc.scope_many(v4, hi, lo) == [sc.scope_int(v, x) for v, x in probes]


def test_netmask_ids_equal_masks():
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "198.51.100.0/24", "2001:db8::/32",
                                              "2001:db8:de::/48", "0.0.0.0/0")]
    m = NetMask(nets)
    rnd = random.Random(4)
    ips = [f"10.{rnd.randrange(3)}.0.{rnd.randrange(256)}" for _ in range(300)] + \
        [str(ipaddress.ip_address(rnd.getrandbits(32))) for _ in range(300)] + \
        [f"2001:db8:{rnd.choice(['de', '5', '0'])}::{rnd.randrange(999)}" for _ in range(300)]
    ints = [ip_int(i) for i in ips]
    ids = m.ids_many(np.array([v == 4 for v, _ in ints]), np.array([x >> 64 for _, x in ints], dtype=np.uint64),
                     np.array([x & (2**64 - 1) for _, x in ints], dtype=np.uint64))
    by_id: dict = {}
    for i, ip in zip(ids.tolist(), ips, strict=True):
        assert by_id.setdefault(i, m.mask(ip)) == m.mask(ip)
    assert len(set(by_id.values())) == len(by_id)  # one id per distinct mask


def test_locate_many_equals_locate(dbs):
    loc = Locator([dbs[0], dbs[1]], Scoper())
    rnd = random.Random(6)
    texts = sorted({_addr(rnd, True) for _ in range(3000)} | {"8.8.8.8", "1.1.1.1", "64:ff9b::808:808"})
    texts = [t for t in texts if loc.scoper.scope(t) == "public"]
    ints = [ip_int(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (ints[i][0] == 6, ints[i][1]))
    texts, ints = [texts[i] for i in order], [ints[i] for i in order]
    cls, locs = Locator([dbs[0], dbs[1]], Scoper()).locate_many([x for _, x in ints], [v == 4 for v, _ in ints],
                                                                 texts)
    for t, c in zip(texts, cls, strict=True):
        want = loc.locate(t)
        got = locs[c]
        assert got.__class__(**{**{f: getattr(got, f) for f in got.__slots__}, "ip": t}) == want, t


def test_addresses_sorted_unique_and_spelled_as_ipaddress():
    rnd = random.Random(8)
    vals = [rnd.getrandbits(128) for _ in range(500)] + [rnd.getrandbits(32) for _ in range(500)] + [0, 1]
    v4 = np.array([i % 2 == 0 and x < 2**32 for i, x in enumerate(vals)] * 2)
    vals = vals * 2
    a = Addresses(v4, np.array([x >> 64 for x in vals], dtype=np.uint64),
                  np.array([x & (2**64 - 1) for x in vals], dtype=np.uint64))
    keys = sorted({(not v, x) for v, x in zip(v4.tolist(), vals, strict=True)})
    assert [(not v, x) for v, x in zip(a.v4.tolist(), a.ints(), strict=True)] == keys
    for i, (v, x) in enumerate(zip(v4.tolist(), vals, strict=True)):
        assert a.text[a.inverse[i]] == str(ipaddress.IPv4Address(x) if v else ipaddress.IPv6Address(x))


@pytest.mark.parametrize("c_module", [True, False])
def test_addr_texts_spell_as_ipaddress(monkeypatch, c_module):
    """The C formatter (agent.sources.capfile._walk.addr_texts) and its Python twin, on addresses with zero
    runs of every length and place, and the ::a.b.c.d forms that ipaddress spells its own way."""
    import agent.flowtable as ft

    if not c_module:
        monkeypatch.setattr(ft, "_c_texts", None)
    elif ft._c_texts is None:
        pytest.skip("the C module is not built")
    rnd = random.Random(11)
    vals = [(True, rnd.getrandbits(32)) for _ in range(300)] + [(True, 0), (True, 2**32 - 1)]
    for _ in range(3000):
        groups = [0 if rnd.random() < 0.5 else rnd.choice([1, 0xFFFF, rnd.getrandbits(16)]) for _ in range(8)]
        vals.append((False, sum(g << (112 - 16 * i) for i, g in enumerate(groups))))
    vals += [(False, x) for x in (0, 1, 0xFFFF << 32 | 0x01020304, 0x01020304, 1 << 32, 0xFFFF << 32, 2**128 - 1)]
    v4 = np.array([v for v, _ in vals])
    texts = ft.addr_texts(v4, np.array([x >> 64 for _, x in vals], dtype=np.uint64),
                          np.array([x & (2**64 - 1) for _, x in vals], dtype=np.uint64))
    assert texts == [str(ipaddress.IPv4Address(x) if v else ipaddress.IPv6Address(x)) for v, x in vals]


def test_iso_times_equal_iso_time():
    rnd = random.Random(2)
    xs = [rnd.uniform(0, 4e9) for _ in range(20000)] + [T, T + 0.5, T + 0.9999995, T + 0.0000005, 0.0]
    xs += [rnd.randrange(4 * 10**9) + (rnd.randrange(10**6) + 0.5) / 1e6 for _ in range(20000)]
    assert iso_times(xs) == [iso_time(x) for x in xs]


def test_iso_time_equals_datetimes_text():
    """iso_time formats each second once and the microseconds itself: the text (and the error, out
    of datetime's range) must be datetime's, carries and half-microsecond ties included."""
    from datetime import UTC, datetime

    def outcome(f, x):
        try:
            return f(x)
        except (ValueError, OverflowError, OSError) as e:
            return type(e)

    rnd = random.Random(5)
    xs = [rnd.uniform(0, 4e9) for _ in range(20000)] + [T, T + 0.5, T + 0.9999995, T + 0.0000005, 0.0, 1.5e-6]
    xs += [rnd.randrange(4 * 10**9) + (rnd.randrange(10**6) + 0.5) / 1e6 for _ in range(20000)]
    xs += [253402300799.0, 253402300799.9999994, -1.5, -0.0000005, 1e20, float("inf"), float("nan")]
    for x in xs:
        want = outcome(lambda t: datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z"), x)
        assert outcome(iso_time, x) == want, repr(x)


def test_table_rows_are_the_flows_they_came_from():
    flows = random_flows(500, 11)
    t = FlowTable.from_flows(flows)
    assert t.flows() == flows


@pytest.mark.parametrize("plain", [False, True])
def test_inventory_is_the_same_both_ways(tmp_path, monkeypatch, dbs, plain):
    """The inventory of a flow log judged in bulk equals the flow-by-flow one, in key order too: rows
    with host names or processes added one by one, and (`plain`: none) rows added per group and
    source (Inventory.add_table), times whole seconds and not."""
    flows = random_flows(1500, 12)
    if plain:
        flows = [Flow(f.proto, f"10.1.0.{i % 4}" if f.src.startswith("10.1.") else f.src, f.sport, f.dst, f.dport,
                      f.packets, f.bytes,
                      T + (i % 500 if i % 3 == 0 else i % 500 * 0.37), T + 600, f.source)
                 for i, f in enumerate(flows)]  # one day (groups are per day), whole seconds and not
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(json.dumps(f.to_json()) + "\n" for f in flows))
    pol, reg = write_setup(tmp_path, payroll())
    # with a register rows are judged one by one (test_register_rows_go_one_by_one_and_agree)
    argv = ["inventory", "--policies", str(pol), "--geoip-db", dbs[0], "--geoip-db", dbs[1],
            *(() if plain else ("--recipients", str(reg))),
            "--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32",
            str(log)]
    got = {}
    from agent.judge import bulk as bulk_mod

    made = []
    real_row = bulk_mod.judged_row
    monkeypatch.setattr(bulk_mod, "judged_row", lambda *a: made.append(1) or real_row(*a))
    for bulk in (True, False):
        monkeypatch.setattr(inputs_mod, "BULK", bulk)
        out = tmp_path / f"inv-{bulk}.json"
        try:
            main([*argv, "--format", "json", "--output", str(out)])
        except SystemExit:
            pass
        got[bulk] = json.loads(out.read_text())
        got[bulk].pop("generated_at", None)
    assert json.dumps(got[True]) == json.dumps(got[False])
    assert got[True]["undeclared"] and (plain or any(r["declared"] for r in got[True]["inventory"]))
    assert any(r["flows"] > 1 and r["verdicts"] for r in got[True]["inventory"])
    if plain:  # a Judged per group and source, not per row
        assert 0 < len(made) < sum(r["flows"] for r in got[True]["inventory"]) / 3


def test_a_report_written_a_slice_at_a_time_is_the_same_report(tmp_path, monkeypatch, dbs):
    """Records are made into JSON CHUNK_RECORDS at a time across blocks (two inputs), and spliced
    into the report: the same report as per flow, and exactly the bytes orjson makes of it."""
    import agent.sinks.report as report_mod

    monkeypatch.setattr(report_mod, "CHUNK_RECORDS", 7)
    flows = random_flows(1200, 9)
    logs = []
    for k, part in enumerate((flows[:700], flows[700:])):
        logs.append(tmp_path / f"f{k}.jsonl")
        logs[-1].write_text("".join(json.dumps(f.to_json()) + "\n" for f in part))
    argv = ["audit", "--geoip-db", dbs[0], "--as-of", "2025-07-01", "--public-net", "198.51.100.0/24",
            "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32", *map(str, logs)]
    a, b = _both(argv, monkeypatch, tmp_path)
    assert a == b and len(a["violations"]) > 14
    raw = (tmp_path / "bulk.json").read_bytes()
    assert raw == orjson.dumps(json.loads(raw), option=orjson.OPT_APPEND_NEWLINE)


def test_group_words_equals_numpys_unique_of_rows():
    """group_words' own sort gives np.unique's first rows and inverse (groups in hash order), and
    collisions still fall back to exact rows."""
    import numpy as np

    from agent.flowtable import _unique_first, group_words

    rng = np.random.default_rng(5)
    for n in (0, 1, 7, 5000):
        h = rng.integers(0, 50, n).astype(np.uint64)
        want_u, want_first, want_inv = np.unique(h, return_index=True, return_inverse=True)
        first, inv = _unique_first(h)
        assert first.tolist() == want_first.tolist() and inv.tolist() == want_inv.ravel().tolist()
        words = rng.integers(0, 4, (n, 5)).astype(np.uint64)
        first, inv = group_words(words)
        assert (words[first][inv] == words).all() and len(first) == len({tuple(r) for r in words.tolist()})


def test_flow_rows_sorted_on_numbers_equal_the_text_sort(dbs, monkeypatch):
    """`audit --flows` of bulk tables sorts on numbers (first seen as its text sorts, then the rest
    of the key in runs of equal times) and gives the rows the sort of their texts gives: times
    whole and not, none, equal, across two tables."""
    import argparse

    from agent.commands.common import build_pipeline
    from agent.judge.bulk import judge_table
    from agent.sinks import flowrows

    flows = random_flows(3000, 21)
    rnd = random.Random(5)
    flows = [Flow(f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes,
                  rnd.choice([f.first_seen, T + 7, T + 7.5, T + 8, 0.0]), f.last_seen, f.source) for f in flows]
    pipe = build_pipeline(argparse.Namespace(policies=None, geoip_db=list(dbs), public_net=(), local_net=(),
                                             recipients=None, as_of=None))
    tables = [(t, judge_table(pipe, t)) for t in (FlowTable.from_flows(flows[:1700]),
                                                  FlowTable.from_flows(flows[1700:]))]
    assert flowrows._table_order(tables) is not None
    got = [r for c in flowrows.sorted_rows([], tables, 700) for r in c]
    monkeypatch.setattr(flowrows, "_table_order", lambda _tables: None)
    want = [r for c in flowrows.sorted_rows([], tables, 700) for r in c]
    assert len(got) == 3000 and got == want
    assert sum(r["first_seen"] == iso_time(T + 7) for r in got) > 100  # long runs of equal times
