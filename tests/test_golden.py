"""Golden end-to-end audits: each folder in tests/cases/ is one case, no code needed to add one.

    tests/cases/<name>/
      args         extra `egress-agent audit` arguments, one per line (optional)
      geoip.yaml   {cidr: {country, registered, continent, represented, anycast, asn, org}} -> test MMDB
                   (absent: no --geoip-db, the embedded registration data)
      policies/    policies for this case (optional; default: the shipped set)
      *.jsonl, *.pcap, *.pcapng   inputs, passed in name order
      expected.json  the parts of the JSON report that must match (cases that audit)
      exit         the expected exit code (optional; default 0 or 1)
      stderr       lines that must appear in standard error, `{case}` standing for the folder
                   (regression cases for bad input: exit 2 and the exact message)

Run with UPDATE_GOLDEN=1 to (re)write expected.json after checking the new output by hand.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import build_city_mmdb

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())
KEYS = ("totals", "destinations_by_country", "inbound_by_country", "verdicts")


def essential(report: dict) -> dict:
    out = {k: report[k] for k in KEYS}
    for kind in ("violations", "indeterminate", "exempt"):
        out[kind] = sorted([r["policy"], r["dst"], r["dst_port"], r["reason"], r["exception"]] for r in report[kind])
    out["redated"] = sorted([r["dst"], r["judged_at"], r["reason"]] for r in report.get("redated", []))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case, cli, tmp_path):
    args = (case / "args").read_text().split("\n") if (case / "args").exists() else []
    args = [a for a in args if a.strip()]
    geo = []
    if (case / "geoip.yaml").exists():
        geo = ["--geoip-db", build_city_mmdb(tmp_path / "geo.mmdb", yaml.safe_load((case / "geoip.yaml").read_text()))]
    pols = ["--policies", str(case / "policies")] if (case / "policies").is_dir() else []
    inputs = sorted(str(p) for p in case.iterdir() if p.suffix in (".jsonl", ".pcap", ".pcapng"))
    r = cli("audit", "--format", "json", *geo, *pols, *args, *inputs)
    assert "Traceback" not in r.stderr, r.stderr
    if (case / "exit").exists():
        assert r.returncode == int((case / "exit").read_text()), r.stderr
    else:
        assert r.returncode in (0, 1), r.stderr
    if (case / "stderr").exists():
        for line in (case / "stderr").read_text().splitlines():
            assert line.replace("{case}", str(case)) in r.stderr, r.stderr
    if r.returncode == 2:
        return
    got = essential(json.loads(r.stdout))
    expected = case / "expected.json"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(expected.read_text())
