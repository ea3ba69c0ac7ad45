"""Golden end-to-end audits: each folder in tests/cases/ is one case, no code needed to add one.

    tests/cases/<name>/
      args         extra `egress-agent audit` arguments, one per line (optional)
      geoip.yaml   {cidr: {country, registered, continent, represented, anycast, asn, org}} -> test MMDB
      policies/    policies for this case (optional; default: the shipped set)
      *.jsonl      inputs (flow logs); every file not named above is passed as an input
      expected.json  the parts of the JSON report that must match

Run with UPDATE_GOLDEN=1 to (re)write expected.json after checking the new output by hand.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import build_city_mmdb

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())
KEYS = ("totals", "destinations_by_country", "verdicts")


def essential(report: dict) -> dict:
    out = {k: report[k] for k in KEYS}
    for kind in ("violations", "indeterminate", "exempt"):
        out[kind] = sorted([r["policy"], r["dst"], r["dst_port"], r["reason"], r["exception"]] for r in report[kind])
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case, cli, tmp_path):
    args = (case / "args").read_text().split("\n") if (case / "args").exists() else []
    args = [a for a in args if a.strip()]
    db = build_city_mmdb(tmp_path / "geo.mmdb", yaml.safe_load((case / "geoip.yaml").read_text()))
    pols = ["--policies", str(case / "policies")] if (case / "policies").is_dir() else []
    inputs = sorted(str(p) for p in case.iterdir() if p.suffix == ".jsonl")
    r = cli("audit", "--format", "json", "--geoip-db", db, *pols, *args, *inputs)
    assert r.returncode in (0, 1), r.stderr
    got = essential(json.loads(r.stdout))
    expected = case / "expected.json"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(expected.read_text())
