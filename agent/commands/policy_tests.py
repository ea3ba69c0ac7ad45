"""`egress-agent policy test`: run a policy's `*.test.yaml` cases through the real pipeline.

A test file names its policy (default: the file name without `.test`), a `locations` table that
stands in for the GeoIP database, and `cases`, each a flow and the expected verdict:

    policy: gdpr-personal-data.yaml
    locations:
      203.0.113.9: {country: US}
    cases:
      - name: US is not adequate on its own
        flow: {src: 10.0.0.5, dst: 203.0.113.9, dport: 443, proto: tcp, time: 2025-06-01}
        expect: violation           # compliant | violation | exempt | indeterminate | not_applicable
        reason: outside-allowed     # optional, exact
        exception: payroll-scc      # optional, for exempt
        message: "substring"        # optional

Documentation ranges count as public in tests (`public:` overrides). Contract: `run_test_file`
returns per-case results; it raises UserError for a malformed test file (file:line: path).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path

from agent import yamlio
from agent.enrich.geoip import FixtureLocator
from agent.enrich.scope import Scoper
from agent.errors import UserError
from agent.flow import Outcome, Who
from agent.judge.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies
from agent.sources.flowlog.jsonl import parse_flow

DOC_NETS = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]
LOCATION_FIELDS = {"country", "registered_country", "represented_country", "continent", "in_eu",
                   "anycast", "asn", "as_org"}
CASE_FIELDS = {"name", "flow", "expect", "reason", "exception", "message"}


@dataclass
class CaseResult:
    file: str
    line: int | None
    name: str
    passed: bool
    detail: str


def test_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.endswith((".test.yaml", ".test.yml")))
    return [path]


def _when(v, where) -> float:
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    if isinstance(v, date):
        return datetime.combine(v, time(12), tzinfo=UTC).timestamp()
    if isinstance(v, (int, float)):
        return float(v)
    raise UserError(f"{where}: '{v}' is not a date or time")


def run_test_file(path: Path, jur: Jurisdictions) -> list[CaseResult]:
    doc, lines, _ = yamlio.load_file(path, "policy test")

    def where(*p):
        line = yamlio.line_of(lines, p)
        return f"{path}:{line}: {yamlio.dotted(p)}" if line else f"{path}: {yamlio.dotted(p)}"

    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise UserError(f"{where()}: a policy test file needs a 'cases' list")
    pol_name = doc.get("policy") or path.name.replace(".test.yaml", ".yaml").replace(".test.yml", ".yml")
    policies = load_policies(path.parent / str(pol_name), jur)
    table = {}
    for ip, fields in (doc.get("locations") or {}).items():
        fields = fields or {}
        if not isinstance(fields, dict) or set(fields) - LOCATION_FIELDS:
            bad = sorted(set(fields) - LOCATION_FIELDS) if isinstance(fields, dict) else fields
            raise UserError(f"{where('locations', ip)}: unknown location field(s) {bad}; "
                            f"known: {', '.join(sorted(LOCATION_FIELDS))}")
        table[str(ip)] = fields
    scoper = Scoper(public_nets=doc.get("public", DOC_NETS), local_nets=doc.get("local", ()))
    # A test case's time is a scenario, possibly in the future: judge it as stated (no re-dating).
    pipe = Pipeline(policies, jur, FixtureLocator(table, scoper), scoper, as_of=date.max)
    results = []
    for i, case in enumerate(doc["cases"]):
        if not isinstance(case, dict) or not isinstance(case.get("flow"), dict) or "expect" not in case:
            raise UserError(f"{where('cases', i)}: a case needs 'flow' (a mapping) and 'expect'")
        if set(case) - CASE_FIELDS:
            raise UserError(f"{where('cases', i)}: unknown field(s) {sorted(set(case) - CASE_FIELDS)}")
        try:
            expect = Outcome(case["expect"])
        except ValueError:
            raise UserError(f"{where('cases', i, 'expect')}: '{case['expect']}' is not one of "
                            f"{', '.join(o.value for o in Outcome)}") from None
        f = dict(case["flow"])
        t = _when(f.pop("time", date(2025, 1, 1)), where("cases", i, "flow", "time"))
        f.setdefault("proto", "tcp")
        f.setdefault("src", "10.0.0.1")
        f.setdefault("dport", 443)
        f["first_seen"] = f["last_seen"] = t
        if isinstance(f.get("process"), dict):
            f["process"] = {k: v for k, v in f["process"].items() if k in Who.__slots__}
        flow = parse_flow(f, where("cases", i, "flow"))
        # a flow from a public address to a local one is an inbound connection (judged by the peer)
        judged = pipe.judge(flow, inbound=pipe.is_inbound(flow))
        v = judged.verdicts[0]
        problems = []
        if v.outcome != expect:
            problems.append(f"expected {expect.value}, got {v.outcome.value}")
        if case.get("reason") and v.reason != case["reason"]:
            problems.append(f"expected reason {case['reason']}, got {v.reason}")
        if case.get("exception") and v.exception != case["exception"]:
            problems.append(f"expected exception {case['exception']}, got {v.exception}")
        if case.get("message") and case["message"] not in v.message:
            problems.append(f"message lacks '{case['message']}'")
        results.append(CaseResult(str(path), yamlio.line_of(lines, ("cases", i)),
                                  str(case.get("name", f"case {i}")), not problems,
                                  "; ".join(problems) + (f" — {v.message}" if problems else "")))
    return results
