"""Engine cases that the shipped policy tests do not cover; table-driven through the real loader."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.enrich.geoip import FixtureLocator
from agent.enrich.scope import Scoper
from agent.flow import Flow, Outcome, Who
from agent.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies
from agent.policy.testing import run_test_file

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
    ({"country": "US"}, {"host": "cdn.example.eu"}, Outcome.COMPLIANT, "allowed"),
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
    assert j.jurisdictions == ("EEA", "EU")


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
