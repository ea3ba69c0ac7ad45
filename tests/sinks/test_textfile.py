"""`audit --textfile`: the run's result for node_exporter, equal to the JSON report it sits beside."""

import json
import shutil
import subprocess
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families


def samples(path) -> dict:
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("geoip", [False, True], ids=["embedded", "mmdb"])
def test_textfile_counts_are_the_reports(cli, tmp_path, city_db, geoip):
    prom = tmp_path / "audit.prom"
    extra = ("--geoip-db", city_db) if geoip else ()
    r = cli("audit", "--format", "json", *extra, "--textfile", prom, "examples/demo.pcap")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    rep = json.loads(r.stdout)
    got = samples(prom)
    assert got[("egress_agent_audit_success", ())] == 1
    assert got[("egress_agent_audit_exit_code", ())] == r.returncode
    assert got[("egress_agent_audit_inputs", ())] == 1
    assert got[("egress_agent_audit_connections_read", ())] == rep["totals"]["flows"]
    assert got[("egress_agent_audit_connections", (("direction", "outbound"),))] == rep["totals"]["egress_flows"]
    want = Counter((v["policy"], v["severity"]) for v in rep["violations"])
    viol = {dict(k[1])["policy"]: v for k, v in got.items() if k[0] == "egress_agent_audit_violations"}
    assert set(viol) == {p["name"] for p in rep["policies"]}  # every policy in force, at 0 too
    assert {p: n for p, n in viol.items() if n} == {p: n for (p, _s), n in want.items()}
    assert prom.stat().st_mode & 0o777 == 0o644
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=prom.read_text(), capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_failed_run_is_exported_without_stale_counts(cli, tmp_path):
    prom = tmp_path / "audit.prom"
    assert cli("audit", "--textfile", prom, "examples/demo.pcap").returncode == 1
    assert any(k[0] == "egress_agent_audit_violations" for k in samples(prom))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    r = cli("audit", "--textfile", prom, bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.jsonl" in r.stderr
    got = samples(prom)
    assert got[("egress_agent_audit_success", ())] == 0 and got[("egress_agent_audit_exit_code", ())] == 2
    assert not any(k[0] == "egress_agent_audit_violations" for k in got)


def test_strict_nothing_judged_is_a_failure_and_an_unwritable_textfile_is_exit_2(cli, tmp_path):
    from tests.helpers import write_pcap
    from tests.names import build

    cap = write_pcap(tmp_path / "public.pcap", [(1.7e9, build.tcp("203.0.113.5", 40000, "198.51.100.7", 443, 1,
                                                                  flags="S"))])
    prom = tmp_path / "audit.prom"
    r = cli("audit", "--strict", "--textfile", prom, cap)
    assert r.returncode == 2 and samples(prom)[("egress_agent_audit_success", ())] == 0
    out = tmp_path / "report.json"
    r = cli("audit", "--format", "json", "--output", out, "--textfile", tmp_path / "no" / "such" / "x.prom",
            "examples/demo.pcap")
    assert r.returncode == 2 and "audit --textfile: cannot write" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(out.read_text())["verdicts"]["violation"] == 2  # the report itself is not lost
