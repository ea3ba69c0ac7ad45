"""The refuse sets against the engine: an address is in a policy's set exactly when the engine
judges a new connection to it a violation of that policy and it is not a never-refuse address."""

import ipaddress
import random
from bisect import bisect_right

import pytest

from agent.config import Config
from agent.enforce.compile import compile_plan
from agent.enforce.cuts import location_cuts
from agent.enforce.never import Keep, never_refuse, ntp_servers, resolvers
from agent.enforce.nft import elements, render
from agent.flow import Flow, Outcome
from agent.judge.build import build_pipeline
from tests.helpers import build_asn_mmdb, build_city_mmdb

POLICIES = {
    "eu.yaml": """\
version: 1
name: eu-data
home: [EU]
enforce: refuse
allow: {jurisdictions: [EEA, EU-ADEQUATE], networks: [203.0.113.64/28]}
deny: {networks: [198.51.100.16/28]}
exceptions:
  - {id: scc, basis: scc, reference: "SCC", owner: dpo@example.com,
     destinations: {networks: [203.0.113.10/32], asns: [64500]}, expires: 2099-01-01}
  - {id: old, basis: scc, reference: "SCC", owner: dpo@example.com,
     destinations: {networks: [203.0.113.11/32]}, expires: 2001-01-01}
""",
    "strict.yaml": """\
version: 1
name: strict
home: [EU]
enforce: refuse
unknown: violation
applies_to: {sources: [192.0.2.128/25], ports: [443, 8000-8100], protocols: [tcp]}
allow: {jurisdictions: [EU]}
""",
    "watch.yaml": """\
version: 1
name: watch
home: [EU]
allow: {jurisdictions: [EU]}
""",
}
LOCATIONS = {
    "198.51.100.0/25": {"country": "DE", "asn": 24940},
    "198.51.100.128/25": {"country": "JP"},
    "203.0.113.0/25": {"country": "US", "asn": 16509},
    "203.0.113.128/26": {"country": "CN"},
    "203.0.113.192/27": {"registered": "FR"},
    "203.0.113.240/28": {"country": "US", "asn": 64500},
    "2001:db8:de::/48": {"country": "DE"},
    "2001:db8:5::/48": {"country": "US"},
    "2001:db8:6::/48": {"country": "JP"},
}
LOCAL = ("192.0.2.0/24", "2001:db8:1::/64")
PUBLIC = ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("enforce")
    for name, text in POLICIES.items():
        (d / name).write_text(text)
    city = build_city_mmdb(d / "city.mmdb", LOCATIONS)
    asn = build_asn_mmdb(d / "asn.mmdb", LOCATIONS)
    cfg = Config(policies=str(d), geoip_databases=(city, asn), local_nets=LOCAL, public_nets=PUBLIC,
                 enforcement={"management_nets": ["203.0.113.12/32"]})
    pipe = build_pipeline(cfg)
    keep, _ = never_refuse(cfg, cfg.local_nets, resolv_conf=str(d / "none"), ntp_files=())
    refusing = [p for p in pipe.policies if p.enforce == "refuse"]
    plan = compile_plan(pipe, refusing, keep, location_cuts(pipe.locator))
    return pipe, plan, keep


def _in(spans, n):
    i = bisect_right(spans, (n, 1 << 129)) - 1
    return i >= 0 and spans[i][0] <= n <= spans[i][1]


def _addresses():
    rnd = random.Random(7)
    out = [f"198.51.100.{i}" for i in range(256)] + [f"203.0.113.{i}" for i in range(256)]
    out += [str(ipaddress.ip_address(rnd.getrandbits(32))) for _ in range(300)]
    for net in ("2001:db8:de::", "2001:db8:5::", "2001:db8:6::", "2001:db8:7::", "2600::", "2a00::"):
        base = int(ipaddress.ip_address(net))
        out += [str(ipaddress.ip_address(base + rnd.getrandbits(80))) for _ in range(20)]
    return out


def test_sets_equal_the_engine_everywhere(world):
    pipe, plan, keep = world
    by_name = {p.name: p for p in plan.policies}
    assert set(by_name) == {"eu-data", "strict"}
    index = {p.name: i for i, p in enumerate(pipe.policies)}
    probes = {"eu-data": ("192.0.2.1", "2001:db8:1::1", 6, 443), "strict": ("192.0.2.200", "2001:db8:1::1", 6, 8050)}
    for dst in _addresses():
        a = ipaddress.ip_address(dst)
        for name, (s4, s6, proto, port) in probes.items():
            if name == "strict" and a.version == 6:
                continue  # it selects IPv4 sources only: no IPv6 rule at all (below)
            flow = Flow(proto, s4 if a.version == 4 else s6, 40000, dst, port, first_seen=1.8e9)
            verdict = pipe.judge(flow).verdicts[index[name]]
            kept = any(a in k.network for k in keep)
            want = verdict.outcome == Outcome.VIOLATION and not kept
            assert _in(by_name[name].dst[a.version], int(a)) == want, (name, dst, verdict)
    assert by_name["strict"].sources == {4: [(int(ipaddress.ip_address("192.0.2.128")),
                                              int(ipaddress.ip_address("192.0.2.255")))], 6: []}


def test_what_the_sets_hold(world):
    _pipe, plan, _keep = world
    eu = next(p for p in plan.policies if p.name == "eu-data")
    texts = elements(4, eu.dst[4])
    # US and CN refused; the exception (.10), the allowed /28 (.64-.79), the management address
    # (.12) and the exception's ASN (.240/28) are holes; the expired exception (.11) is not one
    assert texts == ("198.51.100.16/28, 203.0.113.0-203.0.113.9, 203.0.113.11, 203.0.113.13-203.0.113.63, "
                     "203.0.113.80-203.0.113.191")
    assert elements(6, eu.dst[6]) == "2001:db8:5::/48"
    assert eu.caught == ["management network 203.0.113.12/32 (enforcement.management_nets)"]
    assert plan.problems() == [f"policy {p}: refuse would catch management network 203.0.113.12/32 "
                               "(enforcement.management_nets)" for p in ("eu-data", "strict")]
    strict = next(p for p in plan.policies if p.name == "strict")
    # unknown: violation refuses the registered-only range and every public address without a record
    # too; JP is not in the EU; DE is
    ip = lambda t: int(ipaddress.ip_address(t))  # noqa: E731
    assert all(_in(strict.dst[4], ip(a)) for a in ("198.51.100.200", "203.0.113.200", "1.0.0.1", "223.255.255.1"))
    assert not any(_in(strict.dst[4], ip(a)) for a in ("198.51.100.5", "10.0.0.1", "203.0.113.12", "224.0.0.1"))


def test_the_table_text(world):
    _pipe, plan, _keep = world
    text = render(plan, owner=True, forward=True)
    assert text.startswith("table inet egress_agent_enforce {\n  flags owner\n")
    assert "meta nfproto ipv4 ip saddr @p1_src4 meta l4proto { 6 } th dport { 443, 8000-8100 } ip daddr @p1_dst4 " \
           "jump p1" in text
    assert "meta nfproto ipv6" in text and "@p1_dst6" not in text.split("chain refuse")[1].split("}")[0]
    assert "chain forward {\n    type filter hook forward priority filter" in text
    assert "meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited" in text
    again = render(plan, owner=False, replace=True)
    assert again.startswith("delete table inet egress_agent_enforce\ntable inet egress_agent_enforce {\n")
    assert "flags owner" not in again


def test_never_refuse_sources(tmp_path):
    (tmp_path / "resolv.conf").write_text("# x\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch example\n")
    (tmp_path / "chrony.conf").write_text("pool 2.debian.pool.ntp.org iburst\nserver 198.51.100.123 iburst\n")
    (tmp_path / "timesyncd.conf").write_text("[Time]\nNTP=203.0.113.123 time.example\n")
    assert resolvers(str(tmp_path / "resolv.conf")) == ["192.0.2.53", "fe80::1%eth0"]
    files = (str(tmp_path / "chrony.conf"), str(tmp_path / "timesyncd.conf"))
    assert [s for s, _ in ntp_servers(files)] == ["2.debian.pool.ntp.org", "198.51.100.123", "203.0.113.123",
                                                  "time.example"]
    cfg = Config(enforcement={"management_nets": ["198.51.100.0/28"], "scrapers": ["203.0.113.5"]})
    keep, skipped = never_refuse(cfg, ("10.0.0.0/8",), str(tmp_path / "resolv.conf"), files)
    whys = [k.why for k in keep]
    assert "loopback" in whys and "local network 10.0.0.0/8 (local_nets)" in whys
    assert f"resolver 192.0.2.53 ({tmp_path}/resolv.conf)" in whys and any("fe80::1" in w for w in whys)
    assert any(k.network == ipaddress.ip_network("198.51.100.123/32") and "NTP" in k.why for k in keep)
    assert Keep(ipaddress.ip_network("203.0.113.5/32"), "Prometheus scraper 203.0.113.5 (enforcement.scrapers)") \
        in keep
    assert len(skipped) == 2 and "2.debian.pool.ntp.org" in skipped[0]


def test_judging_once_per_location_equals_judging_every_piece(world, monkeypatch):
    """Pieces with equal database answers share a verdict (Cuts.location_key); judging each piece
    on its own gives the same sets (the database's networks come out of order across its aliases)."""
    pipe, plan, keep = world
    cuts = location_cuts(pipe.locator)
    assert any(len(r[0]) for r in cuts.runs[6]) and all(r[0] == sorted(r[0]) for v in (4, 6) for r in cuts.runs[v])
    monkeypatch.setattr(type(cuts), "location_key", lambda self, v, n: None)
    refusing = [p for p in pipe.policies if p.enforce == "refuse"]
    alone = compile_plan(pipe, refusing, keep, cuts)
    assert [p.dst for p in alone.policies] == [p.dst for p in plan.policies]
