"""The recipient register through the command line: audit names the recipient, policy check lints it."""

import json

from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT
from tests.register_fixtures import DOC_PUBLIC, T, payroll, write_setup

REGISTER = payroll()


def test_audit_names_the_recipient_and_its_basis(cli, tmp_path, city_db):
    write_setup(tmp_path, REGISTER)
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
    write_setup(tmp_path, REGISTER.replace("basis: scc, module: 2", "basis: dpf").replace(
        "established_in: US", "established_in: IE"))
    r = cli("policy", "check", tmp_path / "pol", "--recipients", tmp_path / "reg.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "reg.yaml:10: recipients[0].transfers[0].basis: the Data Privacy Framework certifies US organisations" \
        in r.stderr
