"""The pipeline's verdict cache gives exactly what `evaluate` gives, flow by flow.

Random flows over a small pool of addresses, locations, ports, days, processes and hostnames (so
the cache is hit often and with different destinations), judged through `Pipeline.judge` and
directly through `evaluate`; every verdict must be equal, message included.
"""

import ipaddress
import random
from pathlib import Path

from agent.enrich.geoip import FixtureLocator
from agent.enrich.scope import Scoper
from agent.flow import Flow, Who
from agent.judge.pipeline import Pipeline
from agent.policy.engine import evaluate
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies

REPO = Path(__file__).resolve().parents[2]
J = Jurisdictions.load()
EXTRA = """\
version: 1
name: selective
home: [EU]
applies_to:
  sources: [10.1.0.0/16, "2001:db8:1::/48"]
  ports: [443, "8000-8100"]
  processes: [curl]
allow:
  jurisdictions: [EEA]
  networks: [203.0.113.0/25, "2001:db8:5::/48"]
  hostnames: ["*.example.eu"]
deny:
  networks: [203.0.113.64/26]
  asns: [64501]
unknown: violation
exceptions:
  - {id: e1, basis: scc, reference: r, owner: o, destinations: {asns: [64500]}, expires: 2026-01-01}
  - {id: e2, basis: scc, reference: r, owner: o, destinations: {networks: [198.51.100.0/25]}, from: 2025-06-01,
     expires: 2030-01-01}
"""


def test_cached_verdicts_equal_direct_evaluation(tmp_path):
    (tmp_path / "selective.yaml").write_text(EXTRA)
    for f in (REPO / "policies").glob("*.yaml"):
        if not f.name.endswith(".test.yaml"):
            (tmp_path / f.name).write_text(f.read_text())
    policies = load_policies(str(tmp_path), J)
    rnd = random.Random(11)
    dsts = ([f"203.0.113.{i}" for i in range(0, 256, 7)] + [f"198.51.100.{i}" for i in range(0, 256, 9)]
            + ["2001:db8:5::9", "2001:db8:6::1", "8.8.8.8", "10.9.9.9", "192.0.2.5"])
    countries = ["DE", "FR", "US", "CN", "JP", "GB", "CH", "BR", None]
    profiles = [{"country": rnd.choice(countries), "asn": rnd.choice([None, 64500, 64501, 64502]),
                 "as_org": rnd.choice([None, "Example Org"]), "registered_country": rnd.choice([None, "NL"]),
                 "continent": rnd.choice([None, "EU"]), "anycast": rnd.random() < 0.05} for _ in range(12)]
    table = {d: rnd.choice(profiles) for d in dsts}
    scoper = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"])
    locator = FixtureLocator(table, scoper)
    pipe = Pipeline(policies, J, locator, scoper)
    srcs = ["10.1.2.3", "10.2.2.2", "2001:db8:1::5", "192.168.1.1"]
    days = [1577836800, 1735689600, 1767225600, 1790000000]  # 2020, 2025, 2026, 2026-09
    checked = hits = 0
    for _ in range(6000):
        dst = rnd.choice(dsts)
        src = rnd.choice([s for s in srcs if (":" in s) == (":" in dst)] or srcs)
        flow = Flow(proto=rnd.choice([6, 17]), src=src, sport=40000, dst=dst, dport=rnd.choice([443, 8050, 53]),
                    first_seen=rnd.choice(days) + rnd.random() * 86400,
                    who=rnd.choice([None, Who(comm="curl"), Who(comm="wget")]),
                    hostname=rnd.choice([None, "api.example.eu", "cdn.example.com"]))
        before = len(pipe._cache)
        got = pipe.judge(flow)
        hits += len(pipe._cache) == before and got._for != dst  # reused from another destination
        want = tuple(evaluate(flow, locator.locate(dst), p, J) for p in policies)
        assert got.verdicts == want, (flow, [(a.message, b.message) for a, b in zip(got.verdicts, want, strict=True)
                                             if a != b])
        assert [v.outcome for v in got.outcomes] == [v.outcome for v in want]
        checked += 1
    assert hits > 300, "the pool should make the cache serve other destinations often"
    assert checked == 6000


def test_net_mask_matches_membership():
    from agent.policy.compiled import NetMask

    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "0.0.0.0/0",
                                              "2001:db8::/32", "::/0")]
    m = NetMask(nets)
    rnd = random.Random(2)
    for _ in range(3000):
        a = ipaddress.ip_address(rnd.choice([rnd.getrandbits(32), 0x0A010200 | rnd.getrandbits(8)]))
        if rnd.random() < 0.3:
            a = ipaddress.IPv6Address(0x20010DB8 << 96 | rnd.getrandbits(64))
        want = sum(1 << i for i, n in enumerate(nets) if n.version == a.version and a in n)
        assert m.mask(str(a)) == want
