"""Engine cases that the shipped policy tests do not cover; table-driven through the real loader."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.commands.policy_tests import run_test_file
from agent.enrich.geoip import FixtureLocator
from agent.enrich.scope import Scoper
from agent.flow import Flow, Outcome, Who
from agent.judge.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies

J = Jurisdictions.load()
SCOPER = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24"])
POLICY = """\
version: 1
name: t
home: [EU]
severity: critical
applies_to:
  ports: [443, "8000-8100"]
  processes: [curl]
  units: [api.service]
allow:
  jurisdictions: [EU]
  hostnames: ["*.example.eu"]
unknown: allow
exceptions:
  - {id: e1, basis: consent, reference: r, owner: o, destinations: {asns: [64500]}, expires: 2030-01-01}
"""


CURL = Who(comm="curl", unit="api.service")


def judge(tmp_path, dst, loc, port=443, who=CURL, host=None, when=2025):
    (tmp_path / "t.yaml").write_text(POLICY)
    pipe = Pipeline(load_policies(tmp_path / "t.yaml", J), J, FixtureLocator({dst: loc}, SCOPER), SCOPER)
    t = datetime(when, 6, 1, tzinfo=UTC).timestamp()
    return pipe.judge(Flow(6, "10.0.0.1", 5000, dst, port, first_seen=t, last_seen=t, who=who, hostname=host))


@pytest.mark.parametrize("loc,kw,outcome,reason", [
    ({"country": "DE"}, {}, Outcome.COMPLIANT, "allowed"),
    ({"country": "US"}, {}, Outcome.VIOLATION, "outside-allowed"),
    ({"country": "US"}, {"port": 8050}, Outcome.VIOLATION, "outside-allowed"),
    ({"country": "US"}, {"port": 22}, Outcome.NOT_APPLICABLE, "not-selected"),
    ({"country": "US"}, {"who": None}, Outcome.NOT_APPLICABLE, "not-selected"),
    ({"country": "US"}, {"who": Who(comm="wget", unit="api.service")}, Outcome.NOT_APPLICABLE, "not-selected"),
    ({"country": "US"}, {"host": "cdn.example.eu"}, Outcome.VIOLATION, "outside-allowed"),  # names don't excuse
    ({"country": "US", "asn": 64500}, {}, Outcome.EXEMPT, "exception"),
    ({"registered_country": "DE"}, {}, Outcome.COMPLIANT, "unknown-location:registered-country-only"),
])
def test_table(tmp_path, loc, kw, outcome, reason):
    j = judge(tmp_path, "203.0.113.9", loc, **kw)
    (v,) = j.verdicts
    assert (v.outcome, v.reason) == (outcome, reason)
    assert v.severity == "critical" and v.policy_file.endswith("t.yaml") and len(v.policy_sha256) == 64


def test_violation_message_is_actionable(tmp_path):
    (v,) = judge(tmp_path, "203.0.113.9", {"country": "US"}).verdicts
    assert v.message == ("destination 203.0.113.9 (US) is outside EU required by policy t; "
                         "no exception applies (judged as of 2025-06-01)")


def test_jurisdictions_of_destination_are_reported(tmp_path):
    j = judge(tmp_path, "203.0.113.9", {"country": "DE"})
    assert j.jurisdictions == ("CH-ADEQUATE", "EEA", "EU", "UK-ADEQUATE")  # in 2025


def test_shipped_policy_tests_pass():
    results = [r for f in sorted(Path("policies").glob("*.test.yaml")) for r in run_test_file(f, J)]
    assert len(results) >= 30
    failed = [f"{r.file}:{r.line} {r.name}: {r.detail}" for r in results if not r.passed]
    assert not failed, failed


def test_a_wrong_expectation_fails(tmp_path):
    (tmp_path / "p.yaml").write_text("version: 1\nname: p\nhome: [EU]\nallow: {jurisdictions: [EU]}\n")
    (tmp_path / "p.test.yaml").write_text(
        "locations: {203.0.113.9: {country: US}}\n"
        "cases:\n  - {name: wrong, flow: {dst: 203.0.113.9}, expect: compliant}\n")
    (r,) = run_test_file(tmp_path / "p.test.yaml", J)
    assert not r.passed and "expected compliant, got violation" in r.detail


def test_messages_are_sentences_with_the_embedded_address_and_last_covered_day(tmp_path):
    """Issue 9 section 5: words, not reason codes; NAT64 names the IPv4 looked up; exceptions say
    the last day they cover."""
    from agent.enrich.geoip import FixtureLocator

    (tmp_path / "t.yaml").write_text(POLICY.replace("unknown: allow", "unknown: indeterminate"))
    pols = load_policies(str(tmp_path), J)
    scoper = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24"])
    pipe = Pipeline(pols, J, FixtureLocator({"203.0.113.9": {"country": "US", "asn": 64500},
                                             "198.51.100.1": {"registered_country": "DE"}}, scoper), scoper)
    when = datetime(2025, 6, 1, tzinfo=UTC).timestamp()

    def msg(dst):
        f = Flow(proto=6, src="10.0.0.1", sport=1, dst=dst, dport=443, first_seen=when, who=CURL)
        return pipe.judge(f).verdicts[0].message

    exempt = msg("203.0.113.9")
    assert "would be outside the allowed destinations" in exempt and "outside-allowed" not in exempt
    assert "covers until 2029-12-31" in exempt and exempt.endswith("(judged as of 2025-06-01)")
    unknown = msg("198.51.100.1")
    assert "only the country the address is registered to is known" in unknown and "registered DE" in unknown
    assert "registered-country-only" not in unknown and "no-record" not in unknown
    from agent.enrich.geoip import Locator
    from tests.helpers import build_city_mmdb

    db = build_city_mmdb(tmp_path / "g.mmdb", {"203.0.113.0/24": {"country": "US"}})
    pipe = Pipeline(pols, J, Locator([db], scoper), scoper)
    nat64 = msg("64:ff9b::cb00:7109")  # 203.0.113.9 inside NAT64
    assert nat64.startswith("destination 64:ff9b::cb00:7109 (located by its embedded IPv4 address 203.0.113.9: US")


def test_represented_country_is_a_policy_choice(tmp_path):
    """A US base in the Philippines: GeoIP says country PH, represented_country US."""
    from agent.enrich.geoip import FixtureLocator

    scoper = Scoper(public_nets=["203.0.113.0/24"])
    when = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
    flow = Flow(proto=6, src="10.0.0.1", sport=1, dst="203.0.113.9", dport=443, first_seen=when)
    table = {"203.0.113.9": {"country": "PH", "represented_country": "US"}}
    out = {}
    for rule in ("located", "represented"):
        (tmp_path / "p.yaml").write_text(f"version: 1\nname: p\nhome: [US]\nlocation: {rule}\n"
                                         "allow: {jurisdictions: [HOME]}\n")
        pipe = Pipeline(load_policies(str(tmp_path / "p.yaml"), J), J, FixtureLocator(table, scoper), scoper)
        out[rule] = pipe.judge(flow).verdicts[0]
    assert out["located"].outcome == Outcome.VIOLATION and "(PH)" in out["located"].message
    assert out["represented"].outcome == Outcome.COMPLIANT
    assert "(US, represented; located in PH)" in out["represented"].message


def test_embedded_data_is_registration_and_a_policy_may_trust_it(tmp_path):
    """Issue 9 section 3: without a GeoIP database the embedded RIR data gives the registration
    country only; a policy judges by it only with registration_as_location: true, and says so."""
    from agent.enrich.geoip import Locator

    loc = Locator([], Scoper()).locate("8.8.8.8")
    assert (loc.country, loc.registered_country, loc.unknown_reason) == (None, "US", "registered-country-only")
    flow = Flow(proto=17, src="10.0.0.1", sport=1, dst="8.8.8.8", dport=53,
                first_seen=datetime(2025, 6, 1, tzinfo=UTC).timestamp())
    out = {}
    for trust in ("false", "true"):
        (tmp_path / "p.yaml").write_text(f"version: 1\nname: p\nhome: [EU]\nregistration_as_location: {trust}\n"
                                         "allow: {jurisdictions: [EEA]}\n")
        pipe = Pipeline(load_policies(str(tmp_path / "p.yaml"), J), J, Locator([], Scoper()), Scoper())
        out[trust] = pipe.judge(flow).verdicts[0]
    assert out["false"].outcome == Outcome.INDETERMINATE
    assert out["false"].reason == "unknown-location:registered-country-only"
    assert out["true"].outcome == Outcome.VIOLATION
    assert "(registered US, taken as its location by this policy: no GeoIP location data)" in out["true"].message


TRUST = """\
version: 1
name: n
home: [EU]
allow:
  jurisdictions: [EU]
  hostnames: ["*.example.eu"]
deny:
  hostnames: [bad.example.eu]
trust_names: {trust}
exceptions:
  - {{id: e1, basis: scc, reference: r, owner: o, destinations: {{hostnames: [partner.example]}}, expires: 2030-01-01}}
"""


@pytest.mark.parametrize("trust,source,host,outcome", [
    ("[sni]", "sni", "cdn.example.eu", Outcome.COMPLIANT),
    ("[sni]", "dns", "cdn.example.eu", Outcome.VIOLATION),  # a name from DNS: this policy does not trust it
    ("[]", "sni", "cdn.example.eu", Outcome.VIOLATION),
    ("[dns, sni, quic-sni]", "sni", "bad.example.eu", Outcome.VIOLATION),  # deny wins (not a denied name: allow)
    ("[]", "sni", "bad.example.eu", Outcome.VIOLATION),  # a name in deny always counts
    ("[sni]", "sni", "partner.example", Outcome.EXEMPT),
    ("[]", "sni", "partner.example", Outcome.VIOLATION),  # an exception by name needs a trusted name too
])
def test_names_explain_but_excuse_only_from_trusted_sources(tmp_path, trust, source, host, outcome):
    """A client chooses its SNI and anyone can send a DNS answer: a name alone turns an address
    outside the allowed jurisdictions into compliant or exempt only from a source the policy trusts."""
    (tmp_path / "n.yaml").write_text(TRUST.format(trust=trust))
    pipe = Pipeline(load_policies(tmp_path / "n.yaml", J), J, FixtureLocator({"203.0.113.9": {"country": "US"}},
                                                                              SCOPER), SCOPER)
    t = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
    (v,) = pipe.judge(Flow(6, "10.0.0.1", 5000, "203.0.113.9", 443, first_seen=t, last_seen=t, hostname=host,
                           hostname_source=source)).verdicts
    assert v.outcome == outcome, v.message
    if outcome == Outcome.VIOLATION and host == "cdn.example.eu":
        assert "matches allow, but names from " in v.message and "do not excuse under this policy" in v.message
    if outcome == Outcome.COMPLIANT:
        assert "which this policy trusts" in v.message
