"""The live worker's fast lane (agent.judge.fastlane) against the full path (Daemon._handle): the same
evidence, byte for byte, the same metrics and the same open flows, for flows it takes and flows it
leaves (unknown networks, embedded IPv4, NAT, implausible times, repeats), at their start and end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.config import Config
from agent.daemon import Daemon
from agent.judge.fastlane import FastLane, Opened
from agent.sources.conntrack.table import CtEntry
from tests.helpers import build_city_mmdb

NOW = 1750000000.0
PORTS_POLICY = """\
version: 1
name: fastlane-ports
description: ports and networks, so the verdict key holds a port and a destination mask
home: [EU]
applies_to:
  protocols: [tcp, udp]
  ports: [443, "1000-2000"]
allow:
  jurisdictions: [EEA]
deny:
  networks: ["203.0.113.128/26", "2001:db8:5::/64"]
unknown: violation
"""
LOCATIONS = {
    "198.51.100.0/25": {"country": "DE", "asn": 24940, "org": "Hetzner Online GmbH"},
    "198.51.100.128/25": {"country": "JP"},
    "203.0.113.0/25": {"country": "US", "asn": 16509, "org": "AMAZON-02"},
    "203.0.113.128/26": {"country": "CN"},
    "203.0.113.192/27": {"registered": "FR"},
    "2001:db8:de::/48": {"country": "DE"},
    "2001:db8:5::/48": {"country": "US"},
    "2001:db8:a0::/44": {"anycast": True},
    # a wide record: the network the database answers for 2001:200::1 also holds Teredo's 2001:0::/32,
    # whose addresses are located by the IPv4 address they carry, never by this network
    "2001::/16": {"country": "NL"},
}


def _events(n: int, seed: int) -> list[CtEntry]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        v6 = rnd.random() < 0.4
        if v6:
            dst = rnd.choice([f"2001:db8:de::{rnd.randrange(1, 9999):x}", f"2001:db8:5:{rnd.randrange(3)}::{i:x}",
                              f"2001:db8:a1::{i:x}", f"2001:db8:77::{i:x}",
                              f"64:ff9b::cb00:71{rnd.randrange(256):02x}",  # NAT64: embedded IPv4
                              f"2001:200::{i:x}", "2001:0:4136:e378:8000:63bf:34ff:8efa"])  # Teredo: 203.0.113.5
            src = rnd.choice(["fd00::5", "fd00::6"])
        else:
            dst = rnd.choice([f"198.51.100.{rnd.randrange(256)}", f"203.0.113.{rnd.randrange(256)}"])
            src = rnd.choice(["10.1.0.5", "10.1.0.6", "192.168.1.9"])
        start = rnd.choice([0, 0, int((NOW - rnd.uniform(0, 50)) * 1e9), int(NOW * 1e9) + 3 * 86400 * 10**9,
                            600_000_000 * 10**9])
        nat = (None, None) if rnd.random() < 0.9 else ("192.0.2.77", None)
        out.append(CtEntry(i + 1, rnd.choice([6, 17, 6, 132]), src, 30000 + i, dst, rnd.choice([443, 53, 1500, 8443]),
                           rnd.randrange(1, 4), rnd.randrange(40, 2000), start, *nat))
        if rnd.random() < 0.05:
            out.append(out[-1])  # the same NEW again (a resync)
    return out


@pytest.fixture()
def daemon_factory(tmp_path):
    mmdb = build_city_mmdb(tmp_path / "city.mmdb", LOCATIONS)
    pol = tmp_path / "policies"
    pol.mkdir()
    for p in (Path(__file__).resolve().parent.parent / "policies").glob("*.yaml"):
        if not p.name.endswith(".test.yaml"):
            (pol / p.name).write_text(p.read_text())
    (pol / "ports.yaml").write_text(PORTS_POLICY)

    def make(name: str) -> Daemon:
        cfg = Config(policies=str(pol), geoip_databases=(str(mmdb),), local_nets=("10.1.0.0/16", "fd00::/8"),
                     public_nets=("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"),
                     evidence={"path": str(tmp_path / f"{name}.jsonl")}, attribution=False, host_addresses=False)
        d = Daemon(cfg, None)
        d._stamp = (float("inf"), b'"2025-06-15T15:06:40.123456Z"')  # one record time for both runs
        return d

    return make


def _run(d: Daemon, events: list[CtEntry], fast: bool) -> int:
    """Feed NEW events, then their ends, in batches as the worker does; how many the fast lane took."""
    assert FastLane.usable(d)
    today = int(NOW // 86400)
    took = 0
    for phase in ("new", "destroy"):
        for i, e in enumerate(events):
            if phase == "destroy":
                e = e._replace(packets=e.packets + i % 3, bytes=e.bytes + 100 * (i % 2))
            if phase == "new" and fast and d.fast.new(e, NOW, today):
                took += 1
            else:
                d._handle(phase, e, NOW if phase == "new" else NOW + 5)
            if i % 50 == 49:
                d._write_evidence()
        d._write_evidence()
    d.metrics.flush()
    return took


def _metrics(d: Daemon) -> list[str]:
    return sorted(line for line in generate_latest(d.metrics.registry).decode().splitlines()
                  if line.startswith("egress_agent_") and "_created" not in line and "last_reload" not in line)


@pytest.fixture(params=["c", "python"])
def records_in(request, monkeypatch):
    """The fast lane's records made by agent.sinks._evidence, or by its Python twin."""
    import agent.judge.fastlane as fl

    if request.param == "python":
        monkeypatch.setattr(fl, "_c_records", None)
    elif fl._c_records is None:
        pytest.skip("the C module is not built")
    return request.param


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_lane_writes_what_the_full_path_writes(daemon_factory, seed, records_in):
    events = _events(1500, seed)
    slow, fast = daemon_factory("slow"), daemon_factory("fast")
    assert _run(slow, events, fast=False) == 0
    # the same events twice through the fast lane's daemon: the first pass fills the caches
    took = _run(fast, events, fast=True)
    assert took > len(events) // 3, "the fast lane took too few flows to be tested"
    slow_lines = Path(slow.cfg.evidence_path).read_bytes()
    fast_lines = Path(fast.cfg.evidence_path).read_bytes()
    assert fast_lines == slow_lines
    assert _metrics(fast) == _metrics(slow)
    assert list(fast.open) == list(slow.open) == []


def test_open_flows_are_the_same_until_their_end(daemon_factory):
    events = _events(600, 7)
    slow, fast = daemon_factory("slow"), daemon_factory("fast")
    today = int(NOW // 86400)
    for e in events:  # warm both, then start every flow again under new ids
        slow._handle("new", e, NOW)
        fast._handle("new", e, NOW)
    again = [e._replace(ct_id=e.ct_id + 10_000) for e in events]
    for e in again:
        slow._handle("new", e, NOW)
        if not fast.fast.new(e, NOW, today):
            fast._handle("new", e, NOW)
    assert list(fast.open) == list(slow.open)
    assert any(type(st[0]) is Opened for st in fast.open.values())
    for a, b in zip(slow.open.values(), fast.open.values(), strict=True):
        assert a[1:] == b[1:]  # bytes counted, and whether it has records


def test_a_network_not_looked_up_yet_takes_the_lane_when_its_verdict_is_known(tmp_path, records_in):
    """The lane reads the database for a network it has not seen (as the full path would first): a
    second network of a country already judged is taken, and writes what the full path writes."""
    mmdb = build_city_mmdb(tmp_path / "cn.mmdb", {"198.51.100.0/26": {"country": "CN"},
                                                  "203.0.113.0/26": {"country": "CN"}})
    pol = tmp_path / "policies"
    pol.mkdir()
    for p in (Path(__file__).resolve().parent.parent / "policies").glob("*.yaml"):
        if not p.name.endswith(".test.yaml"):
            (pol / p.name).write_text(p.read_text())

    def make(name: str) -> Daemon:
        cfg = Config(policies=str(pol), geoip_databases=(str(mmdb),),
                     local_nets=("10.1.0.0/16",), public_nets=("198.51.100.0/24", "203.0.113.0/24"),
                     evidence={"path": str(tmp_path / f"{name}.jsonl")}, attribution=False, host_addresses=False)
        d = Daemon(cfg, None)
        d._stamp = (float("inf"), b'"2025-06-15T15:06:40.123456Z"')
        return d

    slow, fast = make("slow"), make("fast")
    first = CtEntry(1, 6, "10.1.0.5", 30001, "198.51.100.9", 443, 2, 300, 0, None, None)
    second = CtEntry(2, 6, "10.1.0.5", 30002, "203.0.113.9", 443, 3, 500, 0, None, None)
    today = int(NOW // 86400)
    for d in (slow, fast):
        d._handle("new", first, NOW)
    slow._handle("new", second, NOW)
    assert fast.fast.new(second, NOW, today), "a known verdict in a new network went down the full path"
    for d in (slow, fast):
        d._handle("destroy", second._replace(bytes=900), NOW + 5)
        d._write_evidence()
        d.metrics.flush()
    assert Path(fast.cfg.evidence_path).read_bytes() == Path(slow.cfg.evidence_path).read_bytes()
    lines = Path(slow.cfg.evidence_path).read_bytes()
    assert lines.count(b'"event":"new"') >= 2 and b'"dst":"203.0.113.9"' in lines and b'"country":"CN"' in lines
    assert _metrics(fast) == _metrics(slow)


def test_the_lane_is_off_where_flows_can_differ_in_more_than_the_event(daemon_factory):
    d = daemon_factory("d")
    assert FastLane.usable(d)
    d.names = object()  # host names from a capture source
    assert not FastLane.usable(d)
    d.names = None
    d.pipeline._by_who = True  # a policy selects on processes
    assert not FastLane.usable(d)


class _Attributor:
    """Who each flow's process is, the same in both runs: shared Who objects (as the attributor's
    cache hands them out), an unattributed one and a new object per call."""

    def __init__(self):
        from agent.flow import Who

        self.calls = 0
        self.shared = [Who(pid=42, comm="curl", exe="/usr/bin/curl", uid=0, user="root", unit="x.service"),
                       Who(pid=7, comm='we"ird', uid=1000, user="u", container="ab" * 32)]
        self.Who = Who

    def who(self, flow):
        self.calls += 1
        k = (flow.sport + flow.dport) % 4
        return self.shared[k] if k < 2 else self.Who(unattributed="socket-gone") if k == 2 else \
            self.Who(uid=5, user=None, unattributed="no-process")


def test_attributed_flows_take_the_fast_lane_with_their_process(daemon_factory, records_in):
    events = _events(1200, 11)
    slow, fast = daemon_factory("slow"), daemon_factory("fast")
    slow.attributor, fast.attributor = _Attributor(), _Attributor()
    assert FastLane.usable(fast)
    today = int(NOW // 86400)
    took = []

    def counted(*a):
        took.append(fast.fast.new(*a))
        return took[-1]

    for d, lane in ((slow, None), (fast, counted)):
        for phase in ("new", "destroy"):
            for i, e in enumerate(events):
                if phase == "destroy":
                    e = e._replace(packets=e.packets + 1, bytes=e.bytes + 60)
                d._dispatch(phase, e, NOW if phase == "new" else NOW + 5, today, lane)
                if i % 50 == 49:
                    d._write_evidence()
            d._write_evidence()
        d.metrics.flush()
    assert sum(took) > len(events) // 3, "the fast lane took too few attributed flows to be tested"
    lines = Path(fast.cfg.evidence_path).read_bytes()
    assert lines == Path(slow.cfg.evidence_path).read_bytes()
    assert b'"process":{"pid":42' in lines and b'we\\"ird' in lines
    assert _metrics(fast) == _metrics(slow)
    assert fast.attributor.calls == slow.attributor.calls  # one lookup per flow, whichever lane


def test_c_iso_time_equals_iso_time():
    """agent.sinks._evidence.iso_time against agent.flow.iso_time: rounding ties, carries into the
    next second, zero fractions, the edges of its range."""
    import math

    ev = pytest.importorskip("agent.sinks._evidence")
    from agent.flow import iso_time

    rnd = random.Random(3)
    xs = [0.0, 1e-7, 0.5e-6, 1.5e-6, 2.5e-6, 0.9999995, 0.99999949, 951782400.0, 1709164799.9999996, 253402300798.0,
          NOW, NOW + 0.0000005, NOW + 0.0000015]
    xs += [rnd.uniform(0, 4e9) for _ in range(20000)] + [math.floor(rnd.uniform(0, 4e9)) + k / 2e6 for k in range(2000)]
    for x in xs:
        assert ev.iso_time(x) == iso_time(x), x
    assert ev.iso_time(-1.0) is None and ev.iso_time(253402300800.0) is None and ev.iso_time(float("nan")) is None


def test_a_failing_batch_lookup_leaves_every_flow_judged(daemon_factory):
    """If asking about a batch's sockets at once fails for any reason, the worker goes on: each flow
    is asked alone and judged, and nothing is lost uncounted."""
    d = daemon_factory("d")
    d.attributor = _Attributor()

    def broken(flows):
        raise RuntimeError("a bug in the batch lookup")

    d.attributor.prefetch = broken
    events = _events(200, 5)
    d.queue.put(([("new", e, True) for e in events], NOW))
    d.pending, d.pending_flows = len(events), len(events)
    d.stop.set()  # the worker drains what is queued, then returns
    d._worker()
    d.metrics.flush()
    assert d.metrics.judged_flows.labels("conntrack")._value.get() == len(events)
    assert d.attributor.calls > 0 and d.pending == 0


def _collector_events(n: int, seed: int):
    """The same flows as a collector's items (NetflowEntry): no NAT, reply counters, flags, exporter."""
    from agent.enrich.scope import ip_parse
    from agent.sources.netflow.collect import ID_BASE, NetflowEntry

    rnd = random.Random(seed)
    out = []
    for e in _events(n, seed):
        out.append(NetflowEntry(ID_BASE + e.ct_id, e.proto, e.src, e.sport, e.dst, e.dport, e.packets, e.bytes,
                                e.start_ns, None, None, NOW - 1, "netflow", rnd.choice(["paris", "other"]),
                                "192.0.2.1", rnd.choice([None, 3]), rnd.choice([None, 7]), rnd.choice([None, 1, 64]),
                                rnd.choice(["port", "syn", "first-packet"]), rnd.randrange(0, 9),
                                rnd.randrange(0, 9000), rnd.choice([0, 0x1A, 0x02]), rnd.choice([0, 0x12]),
                                # mostly with its addresses parsed, as the collector sends it
                                False, *((ip_parse(e.dst), ip_parse(e.src)) if rnd.random() < 0.8 else (None, None))))
    return out


@pytest.mark.parametrize("seed", [4, 5])
def test_collector_items_take_the_fast_lane_and_write_what_the_full_path_writes(daemon_factory, seed, records_in):
    """A collector's connections ("flow" items, then "destroy" with final counters both ways): the
    fast lane's records carry the connection's members and the exporter's facts byte for byte as the
    full path's do, with the same metrics."""
    events = _collector_events(1200, seed)
    slow, fast = daemon_factory("slow"), daemon_factory("fast")
    today = int(NOW // 86400)
    took = 0
    for d, use_fast in ((slow, False), (fast, True)):
        for phase in ("flow", "destroy"):
            for i, e in enumerate(events):
                if phase == "destroy":
                    e = e._replace(packets=e.packets + i % 3, bytes=e.bytes + 100 * (i % 2),
                                   packets_reply=e.packets_reply + 1, bytes_reply=e.bytes_reply + 7)
                    d._handle("destroy", e, NOW + 5)
                elif use_fast and d.fast.new(e, NOW, today):
                    took += 1
                else:
                    d._handle("flow", e, NOW, None)
                if i % 50 == 49:
                    d._write_evidence()
            d._write_evidence()
        d.metrics.flush()
    assert took > len(events) // 3, "the fast lane took too few collector items to be tested"
    slow_lines = Path(slow.cfg.evidence_path).read_bytes()
    assert Path(fast.cfg.evidence_path).read_bytes() == slow_lines
    assert b'"exporter":"paris"' in slow_lines and b'"source":"netflow:' in slow_lines
    assert _metrics(fast) == _metrics(slow)
