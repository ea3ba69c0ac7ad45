"""Property: for any policy built from the pieces below, an address is in its refuse set exactly
when the engine judges a new connection to it a violation (hypothesis draws the policies)."""

import ipaddress
from bisect import bisect_right

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config
from agent.enforce.compile import compile_plan
from agent.enforce.cuts import location_cuts
from agent.flow import Flow, Outcome
from agent.judge.build import build_pipeline
from tests.enforce.test_compile import LOCAL, LOCATIONS, PUBLIC
from tests.helpers import build_asn_mmdb, build_city_mmdb

nets = st.builds(lambda base, n, plen: f"{base}.{n & (256 - (1 << (32 - plen)))}/{plen}",
                 st.sampled_from(["198.51.100", "203.0.113"]), st.integers(0, 255), st.integers(24, 32))
policy = st.fixed_dictionaries({
    "allow": st.lists(st.sampled_from(["EEA", "EU", "EU-ADEQUATE"]), min_size=1, max_size=2, unique=True),
    "allow_nets": st.lists(nets, max_size=2), "deny_nets": st.lists(nets, max_size=2),
    "unknown": st.sampled_from(["indeterminate", "violation", "allow"]),
    "exceptions": st.lists(st.tuples(nets, st.sampled_from(["2001-01-01", "2099-01-01"])), max_size=3),
})


def _yaml(p) -> str:
    lines = ["version: 1", "name: drawn", "home: [EU]", "enforce: refuse", f"unknown: {p['unknown']}",
             f"allow: {{jurisdictions: [{', '.join(p['allow'])}]"
             + (f", networks: [{', '.join(p['allow_nets'])}]" if p["allow_nets"] else "") + "}"]
    if p["deny_nets"]:
        lines.append(f"deny: {{networks: [{', '.join(p['deny_nets'])}]}}")
    if p["exceptions"]:
        lines.append("exceptions:")
        for i, (net, expires) in enumerate(p["exceptions"]):
            lines.append(f"  - {{id: e{i}, basis: scc, reference: r, owner: o@example.com, "
                         f"destinations: {{networks: [{net}]}}, expires: {expires}}}")
    return "\n".join(lines) + "\n"


_DBS: dict = {}


def _dbs(factory):
    """The test databases, built once for every drawn policy."""
    if not _DBS:
        d = factory.mktemp("dbs")
        _DBS["city"], _DBS["asn"] = build_city_mmdb(d / "city.mmdb", LOCATIONS), build_asn_mmdb(d / "asn.mmdb",
                                                                                                   LOCATIONS)
    return _DBS["city"], _DBS["asn"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=policy)
def test_refuse_set_is_the_engines_violations(tmp_path_factory, p):
    city, asn = _dbs(tmp_path_factory)
    d = tmp_path_factory.mktemp("drawn")
    (d / "p.yaml").write_text(_yaml(p))
    pipe = build_pipeline(Config(policies=str(d), geoip_databases=(str(city), str(asn)), local_nets=LOCAL,
                                 public_nets=PUBLIC))
    plan = compile_plan(pipe, pipe.policies, [], location_cuts(pipe.locator))
    spans = plan.policies[0].dst[4]
    for base in ("198.51.100", "203.0.113"):
        for last in range(256):
            dst = f"{base}.{last}"
            n = int(ipaddress.ip_address(dst))
            v = pipe.judge(Flow(6, "192.0.2.1", 40000, dst, 443, first_seen=1.8e9)).outcomes[0]
            i = bisect_right(spans, (n, 1 << 33)) - 1
            assert (i >= 0 and spans[i][0] <= n <= spans[i][1]) == (v.outcome == Outcome.VIOLATION), (dst, v, p)
