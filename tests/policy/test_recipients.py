"""The recipient register: loading and lints, matching order, each basis exempting, declared locations."""

import textwrap
from datetime import UTC, date, datetime

import pytest

from agent.enrich.geoip import FixtureLocator
from agent.enrich.scope import Scoper
from agent.errors import UserError
from agent.flow import Flow, Outcome
from agent.judge.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies
from agent.policy.recipients import load_recipients

J = Jurisdictions.load()
TODAY = date(2026, 6, 1)
SCOPER = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24"])
POLICIES = """\
version: 1
name: {name}
home: [{home}]
recipient_location: {mode}
allow: {{jurisdictions: [EEA]}}
"""


def policies(tmp_path, mode="observed"):
    d = tmp_path / "pol"
    d.mkdir(exist_ok=True)
    (d / "gdpr.yaml").write_text(POLICIES.format(name="gdpr", home="EU", mode=mode))
    (d / "pipl.yaml").write_text(POLICIES.format(name="pipl", home="CN-MAINLAND", mode=mode))
    return load_policies(d, J)


def register(tmp_path, text):
    p = tmp_path / "reg.yaml"
    p.write_text(textwrap.dedent(text))
    return p


BASE = """\
version: 1
recipients:
  - id: by-name
    name: Name Co
    role: processor
    established_in: US
    processing_locations: [US]
    match: {hostnames: ["*.vendor.example"]}
    transfers:
      - {policy: gdpr, basis: scc, module: 2, reference: "SCC 2", owner: dpo@example.com, expires: 2030-01-01}
  - id: by-asn
    name: ASN Co
    role: sub-processor
    established_in: DE
    processing_locations: [DE, US]
    match: {asns: [AS64500]}
  - id: by-net
    name: Net Co
    role: controller
    established_in: FR
    processing_locations: [FR]
    match: {networks: [203.0.113.0/28]}
"""


def pipe(tmp_path, text=BASE, mode="observed", loc=None):
    pols = policies(tmp_path, mode)
    reg, _ = load_recipients(register(tmp_path, text), pols, J, TODAY)
    loc = loc or {"country": "US", "asn": 64500}
    return Pipeline(pols, J, FixtureLocator({"203.0.113.9": loc, "198.51.100.9": loc}, SCOPER), SCOPER,
                    register=reg, as_of=date(2099, 1, 1))  # flows are judged on their own day


def judge(p, dst="203.0.113.9", host=None, when=TODAY):
    t = datetime(when.year, when.month, when.day, tzinfo=UTC).timestamp()
    j = p.judge(Flow(6, "10.0.0.1", 5000, dst, 443, first_seen=t, last_seen=t, hostname=host,
                     hostname_source="sni" if host else None))
    return j, {v.policy: v for v in j.verdicts}


def test_matching_order_name_then_asn_then_network(tmp_path):
    p = pipe(tmp_path)
    assert judge(p, host="api.vendor.example")[0].recipient.id == "by-name"
    assert judge(p)[0].recipient.id == "by-asn"  # AS64500 before the network
    p = pipe(tmp_path, loc={"country": "US"})
    assert judge(p)[0].recipient.id == "by-net"
    assert judge(p, dst="198.51.100.9")[0].recipient is None


def test_transfer_exempts_and_names_recipient_and_basis(tmp_path):
    j, v = judge(pipe(tmp_path), host="api.vendor.example")
    g = v["gdpr"]
    assert (g.outcome, g.exception) == (Outcome.EXEMPT, "by-name:scc")
    assert "exempt as a transfer to Name Co (processor, established in US) under SCC module 2 " \
           "(controller to processor) (SCC 2; owner dpo@example.com; covers until 2029-12-31)" in g.message
    assert g.message.startswith("destination 203.0.113.9 (api.vendor.example, from TLS SNI; US")
    _, v = judge(pipe(tmp_path))  # by-asn has no basis for gdpr
    assert v["gdpr"].outcome == Outcome.VIOLATION
    assert "recipient ASN Co (sub-processor, established in DE) has no basis in force for policy gdpr" \
           in v["gdpr"].message
    _, v = judge(pipe(tmp_path), host="api.vendor.example", when=date(2030, 1, 1))
    assert v["gdpr"].outcome == Outcome.VIOLATION and "the scc of recipient by-name expired 2030-01-01" \
        in v["gdpr"].message


BASES = [
    ("gdpr", "adequacy", "", "adequacy decision"),
    ("gdpr", "dpf", "", "EU-US Data Privacy Framework certification"),
    ("gdpr", "scc", "module: 3, ", "SCC module 3 (processor to processor)"),
    ("gdpr", "bcr", "", "binding corporate rules"),
    ("gdpr", "derogation", "derogation: consent, ", "GDPR art. 49 derogation (consent)"),
    ("gdpr", "certification", "", "certification"),
    ("pipl", "security-assessment", "", "CAC security assessment"),
    ("pipl", "standard-contract", "filing_number: SC-1, ", "PIPL standard contract (filing SC-1)"),
    ("pipl", "certification", "", "certification"),
    ("pipl", "exempt-contract-necessity", "", "exemption under the 2024 CAC Provisions (contract necessity)"),
    ("pipl", "exempt-hr-management", "", "exemption under the 2024 CAC Provisions (hr management)"),
    ("pipl", "exempt-emergency", "", "exemption under the 2024 CAC Provisions (emergency)"),
    ("pipl", "exempt-under-threshold", "declared: {individuals_per_year: 5000}, ",
     "exemption under the 2024 CAC Provisions (under threshold)"),
]


def one_recipient(policy: str, basis: str, extra: str, country: str) -> str:
    """A register of one recipient `r` (R Inc, in `country`) with one transfer."""
    return f"""\
        version: 1
        recipients:
          - id: r
            name: R Inc
            role: processor
            established_in: {country}
            processing_locations: [{country}]
            match: {{networks: [203.0.113.0/24]}}
            transfers:
              - {{policy: {policy}, basis: {basis}, {extra}reference: ref, owner: o, expires: 2030-01-01}}
        """


@pytest.mark.parametrize("policy,basis,extra,words", BASES)
def test_each_basis_exempts_in_its_own_words(tmp_path, policy, basis, extra, words):
    _, v = judge(pipe(tmp_path, one_recipient(policy, basis, extra, "US"), loc={"country": "US"}))
    assert (v[policy].outcome, v[policy].exception) == (Outcome.EXEMPT, f"r:{basis}")
    assert f"under {words} (ref;" in v[policy].message


LINTS = [
    ("pipl", "standard-contract", "filing_number: F, declared: {individuals_per_year: 1500000}, ",
     "needs a CAC security assessment"),
    ("pipl", "standard-contract", "filing_number: F, declared: {sensitive_individuals_per_year: 20000}, ",
     "more than 10,000"),
    ("pipl", "certification", "declared: {critical_information_infrastructure: true}, ",
     "operates critical information infrastructure"),
    ("pipl", "exempt-contract-necessity", "declared: {data_categories: [important]}, ", "important data"),
    ("pipl", "exempt-under-threshold", "declared: {individuals_per_year: 150000}, ", "fewer than 100,000"),
    ("pipl", "standard-contract", "", "needs its filing_number"),
    ("pipl", "scc", "module: 2, ", "'scc' is not a PIPL basis"),
    ("gdpr", "standard-contract", "filing_number: F, ", "is a PIPL basis"),
    ("gdpr", "dpf", "", "certifies US organisations; R Inc is established in DE"),
    ("gdpr", "scc", "", "scc needs its module"),
    ("gdpr", "derogation", "", "needs the art. 49(1) point"),
    ("nope", "scc", "module: 1, ", "transfer for policy 'nope', which is not loaded"),
]


@pytest.mark.parametrize("policy,basis,extra,message", LINTS)
def test_each_lint(tmp_path, policy, basis, extra, message):
    with pytest.raises(UserError) as e:
        load_recipients(register(tmp_path, one_recipient(policy, basis, extra, "DE")), policies(tmp_path), J, TODAY)
    (problem,) = e.value.problems
    assert "reg.yaml:10: recipients[0].transfers[0].basis:" in problem and message in problem


def test_schema_errors_duplicates_and_expiry_warnings(tmp_path):
    text = """\
        version: 1
        recipients:
          - {id: a, name: A, role: vendor, established_in: US, processing_locations: [US], match: {asns: [1]}}
          - {id: b, name: B, role: processor, established_in: US, processing_locations: [US],
             match: {hostnames: ["x*.example"]}}
          - {id: b, name: B2, role: processor, established_in: US, processing_locations: [US], match: {asns: [2]}}
        """
    with pytest.raises(UserError) as e:
        load_recipients(register(tmp_path, text), policies(tmp_path), J, TODAY)
    assert any("reg.yaml:3: recipients[0].role" in p for p in e.value.problems)
    text = text.replace("role: vendor", "role: processor")
    with pytest.raises(UserError) as e:
        load_recipients(register(tmp_path, text), policies(tmp_path), J, TODAY)
    probs = "\n".join(e.value.problems)
    assert "reg.yaml:5: recipients[1].match.hostnames[0]: bad hostname pattern" in probs
    assert "reg.yaml:6: recipients[2].id: recipient 'b' is already defined" in probs
    text = BASE.replace("expires: 2030-01-01", "expires: 2026-06-20")
    _, warnings = load_recipients(register(tmp_path, text), policies(tmp_path), J, TODAY)
    where = tmp_path / "reg.yaml"
    assert warnings == [f"{where}: recipient by-name: scc for policy gdpr expires 2026-06-20, in 19 days"]
    _, warnings = load_recipients(register(tmp_path, BASE.replace("2030-01-01", "2026-01-01")), policies(tmp_path),
                                  J, TODAY)
    assert "expired 2026-01-01 (it covered until 2025-12-31)" in warnings[0]


@pytest.mark.parametrize("mode,country,outcome", [
    ("observed", "DE", Outcome.COMPLIANT),   # by-asn declares DE and US; observed DE is what counts
    ("declared", "DE", Outcome.VIOLATION),   # US among the declared locations
    ("both", "DE", Outcome.VIOLATION),
    ("declared", "US", Outcome.VIOLATION),
    ("observed", "US", Outcome.VIOLATION),
])
def test_recipient_location_modes(tmp_path, mode, country, outcome):
    _, v = judge(pipe(tmp_path, mode=mode, loc={"country": country, "asn": 64500}))
    assert v["gdpr"].outcome == outcome
    if mode != "observed":
        assert "ASN Co (sub-processor, established in DE), which declares processing in US, outside EEA" \
            in v["gdpr"].message


def test_declared_locations_inside_are_compliant_whatever_geoip_says(tmp_path):
    text = BASE.replace("processing_locations: [DE, US]", "processing_locations: [DE, IE]")
    _, v = judge(pipe(tmp_path, text, mode="declared", loc={"country": "US", "asn": 64500}))
    assert v["gdpr"].outcome == Outcome.COMPLIANT and "judged by declared locations" in v["gdpr"].message


def test_a_name_alone_outside_the_declared_locations_is_no_exemption(tmp_path):
    """A forged SNI matches a recipient by name, but the address is in the US while the recipient
    declares processing only in DE: the verdict says so and does not exempt; inside its declared
    locations the match by name stands, and matches by ASN or network are not affected."""
    text = BASE.replace("processing_locations: [US]", "processing_locations: [DE]", 1)
    assert text != BASE
    j, v = judge(pipe(tmp_path, text), host="api.vendor.example")
    g = v["gdpr"]
    assert g.outcome == Outcome.VIOLATION and j.recipient.id == "by-name"
    assert "names recipient by-name, but the address is located in US, outside the recipient's declared " \
           "processing locations (DE): not an exemption" in g.message
    j, v = judge(pipe(tmp_path, text, loc={"country": "DE", "asn": 64500}), host="api.vendor.example")
    assert j.recipient.id == "by-name" and "not an exemption" not in v["gdpr"].message
