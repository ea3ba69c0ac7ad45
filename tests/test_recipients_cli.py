"""The recipient register through the command line: audit names the recipient, policy check lints it."""

import json

from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT

T = 1750000000.0
DOC_PUBLIC = ["--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24"]
POLICY = "version: 1\nname: eu\nhome: [EU]\nallow: {jurisdictions: [EEA]}\n"
REGISTER = """\
version: 1
recipients:
  - id: payroll
    name: Example Payroll Inc.
    role: processor
    established_in: US
    processing_locations: [US]
    match: {hostnames: ["*.payroll.example"]}
    transfers:
      - {policy: eu, basis: scc, module: 2, reference: "SCC-7", owner: dpo@example.com, expires: 2099-01-01}
"""


def test_audit_names_the_recipient_and_its_basis(cli, tmp_path, city_db):
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "eu.yaml").write_text(POLICY)
    (tmp_path / "reg.yaml").write_text(REGISTER)
    hello = lambda n: build.records(build.client_hello(n))  # noqa: E731
    cap = write_pcap(tmp_path / "c.pcap", [
        (T, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, hello("api.payroll.example"))),  # US, declared
        (T + 1, build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1, hello("unknown.example")))])  # US, nobody
    r = cli("audit", "--format", "json", "--flows", *DOC_PUBLIC, "--geoip-db", city_db, "--policies",
            tmp_path / "pol", "--recipients", tmp_path / "reg.yaml", cap)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    (ex,) = rep["exempt"]
    assert (ex["recipient"], ex["exception"], ex["hostname"]) == ("payroll", "payroll:scc", "api.payroll.example")
    assert "exempt as a transfer to Example Payroll Inc. (processor, established in US) under SCC module 2" \
        in ex["message"]
    (v,) = rep["violations"]
    assert v["recipient"] is None and v["hostname"] == "unknown.example"
    assert {f["sport"]: f["recipient"] for f in rep["flows"] if f["src"] == CLIENT} == {50000: "payroll",
                                                                                       50001: None}


def test_policy_check_reports_register_problems_with_file_and_line(cli, tmp_path):
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "eu.yaml").write_text(POLICY)
    (tmp_path / "reg.yaml").write_text(REGISTER.replace("basis: scc, module: 2", "basis: dpf").replace(
        "established_in: US", "established_in: IE"))
    r = cli("policy", "check", tmp_path / "pol", "--recipients", tmp_path / "reg.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "reg.yaml:10: recipients[0].transfers[0].basis: the Data Privacy Framework certifies US organisations" \
        in r.stderr
