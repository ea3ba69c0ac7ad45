"""`egress-agent inventory`: exporter -> recipient -> countries, and the diff with the register."""

import csv
import io
import json

from agent.flow import Who
from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT
from tests.register_fixtures import DOC_PUBLIC, T, payroll, write_setup

REGISTER = payroll() + """\
  - id: analytics
    name: Example Analytics SAS
    role: sub-processor
    established_in: FR
    processing_locations: [FR]
    match: {hostnames: ["*.analytics.example"]}
  - id: never
    name: Never Seen Ltd
    role: processor
    established_in: IE
    processing_locations: [IE]
    match: {networks: [198.51.100.200/32]}
"""


def _setup(tmp_path):
    write_setup(tmp_path, REGISTER)
    hello = lambda n: build.records(build.client_hello(n))  # noqa: E731
    dns = build.dns_response("cdn.analytics.example", [("cdn.analytics.example", "A", 300, "198.51.100.7")])
    return write_pcap(tmp_path / "c.pcap", [
        (T, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, hello("api.payroll.example"))),  # US, as declared
        (T + 0.99, build.dns_query("cdn.analytics.example")),
        (T + 1, dns),
        (T + 2, build.tcp(CLIENT, 50001, "198.51.100.7", 443, 1, flags="S")),  # DE: analytics declared FR only
        (T + 3, build.tcp(CLIENT, 50002, "203.0.113.9", 443, 1, hello("eu.tracker.example"))),  # undeclared
        (T + 4, build.tcp(CLIENT, 50003, "198.51.100.130", 443, 1, flags="S")),  # JP, no name, no ASN
    ])


def test_inventory_json_diff_and_exit(cli, tmp_path, city_db, asn_db):
    cap = _setup(tmp_path)
    args = ("inventory", *DOC_PUBLIC, "--geoip-db", city_db, "--geoip-db", asn_db, "--policies", tmp_path / "pol",
            "--recipients", tmp_path / "reg.yaml", cap)
    r = cli(*args, "--format", "json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    rep = json.loads(r.stdout)
    rows = {row["recipient"]: row for row in rep["inventory"]}
    assert rows["payroll"]["declared"] and rows["payroll"]["bases"] == ["payroll:scc"]
    assert rows["payroll"]["exporter"] == "net:192.0.2.0/24" and list(rows["payroll"]["countries"]) == ["US"]
    assert rows["analytics"]["hostnames"] == ["cdn.analytics.example"]
    assert {u["recipient"] for u in rep["undeclared"]} == {"host:tracker.example", "unknown"}
    assert [u["recipient"] for u in rep["unseen"]] == ["never"]
    (out,) = rep["outside_declared_locations"]
    assert (out["recipient"], out["declared"], out["observed_outside"]) == ("analytics", ["FR"], ["DE"])
    r = cli(*args, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {(t["recipient"], t["country"], t["declared"]) for t in table} >= {("payroll", "US", "yes"),
                                                                              ("analytics", "DE", "yes")}
    r = cli(*args)
    assert "Seen but undeclared: 2" in r.stdout and "Declared but never seen: 1" in r.stdout


def test_exporter_is_the_process_when_known():
    from agent.commands.inventory import exporter_of
    from agent.flow import Flow

    f = Flow(6, "192.0.2.1", 1, "203.0.113.9", 443)
    assert exporter_of(f) == "net:192.0.2.0/24"
    assert exporter_of(Flow(6, "2001:db8:1::5", 1, "203.0.113.9", 443)) == "net:2001:db8:1::/64"
    assert exporter_of(f.__class__(6, "192.0.2.1", 1, "203.0.113.9", 443, who=Who(comm="curl", unit="api.service"))) \
        == "unit:api.service"
    assert exporter_of(Flow(6, "192.0.2.1", 1, "203.0.113.9", 443, who=Who(exe="/usr/bin/python3.11"))) == \
        "process:python3.11"


def test_demo_capture_shows_an_undeclared_recipient(cli):
    r = cli("inventory", "--format", "json", "--recipients", "recipients", "examples/demo.pcap")
    rep = json.loads(r.stdout)
    assert r.returncode == 1
    assert "host:heise.de" in {u["recipient"] for u in rep["undeclared"]}
    assert {u["recipient"] for u in rep["unseen"]} == {"example-payroll", "example-analytics-eu",
                                                       "example-logistics-de"}


def test_capture_evidence_lines_of_one_flow_count_once(tmp_path):
    from agent.sources.flowlog.jsonl import read_jsonl

    flow = {"proto": "tcp", "src": "192.0.2.1", "sport": 5, "dst": "203.0.113.9", "dport": 443,
            "first_seen": "2025-06-15T00:00:00Z", "source": "capture"}
    lines = [{"event": "new", "policy": p, "verdict": "violation", "flow": flow} for p in ("a", "b")]
    lines.append({"event": "new", "policy": "a", "verdict": "violation", "flow": {**flow, "sport": 6}})
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    flows, _ = read_jsonl(str(tmp_path / "e.jsonl"))
    assert sorted(f.sport for f in flows) == [5, 6]


def test_undeclared_recipient_is_the_registrable_domain():
    from agent.flow import Flow, Location
    from agent.policy.recipients import fallback_recipient

    loc = Location(ip="203.0.113.9", scope="public", asn=64500, as_org="Example Org")
    name = lambda h: fallback_recipient(Flow(6, "192.0.2.1", 1, "203.0.113.9", 443, hostname=h), loc)  # noqa: E731
    assert name("www.bbc.co.uk") == "host:bbc.co.uk"
    assert name("s3.eu-central-1.amazonaws.com") == "host:amazonaws.com"
    assert name("files.tracker.example") == "host:tracker.example"
    assert name(None) == "AS64500 Example Org"


def test_bad_html_path_keeps_the_report_and_exits_2(cli, tmp_path):
    r = cli("audit", "--format", "json", "--html", tmp_path / "no" / "such" / "r.html", "examples/demo.pcap")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot write report" in r.stderr
    assert json.loads(r.stdout)["verdicts"]["violation"] == 2  # the report itself was written first


def test_remembered_undeclared_recipients_survive_corrupt_or_hostile_files(tmp_path):
    from types import SimpleNamespace

    from agent.daemon import MAX_UNDECLARED, Daemon

    path = tmp_path / "undeclared-recipients.json"
    load = lambda: Daemon._load_undeclared(SimpleNamespace(_undeclared_path=str(path)))  # noqa: E731
    assert load() == set()  # no file yet
    for text in ("{not json", '{"a": 1}', "", "\x00" * 10):
        path.write_text(text)
        assert load() == set()  # a warning, never an exception: names are logged again, nothing is lost
    path.write_text(json.dumps(["host:a.example", 5, None] + [f"k{i}" for i in range(MAX_UNDECLARED + 50)]))
    got = load()
    assert "host:a.example" in got and len(got) <= MAX_UNDECLARED


def test_rows_are_outbound_connections_with_what_came_back(cli, tmp_path, city_db, asn_db):
    """A connection and its replies are one row: what the local side sent, what it received, and how
    its opener is known; an inbound connection is no transfer of the inventory."""
    write_setup(tmp_path, REGISTER)
    path = write_pcap(tmp_path / "two-way.pcap", [
        (T, build.tcp(CLIENT, 50010, "203.0.113.9", 443, 1, flags="S")),
        (T + 0.1, build.tcp("203.0.113.9", 443, CLIENT, 50010, 1, flags="SA")),
        (T + 0.2, build.tcp(CLIENT, 50010, "203.0.113.9", 443, 2, b"q" * 100, flags="PA")),
        (T + 0.3, build.tcp("203.0.113.9", 443, CLIENT, 50010, 2, b"r" * 1000, flags="PA")),
        (T + 1, build.tcp("198.51.100.7", 51000, CLIENT, 22, 1, flags="S")),  # inbound
        (T + 1.1, build.tcp(CLIENT, 22, "198.51.100.7", 51000, 1, flags="SA")),
    ])
    args = ("inventory", *DOC_PUBLIC, "--geoip-db", city_db, "--geoip-db", asn_db, "--policies", tmp_path / "pol",
            "--recipients", tmp_path / "reg.yaml", path)
    r = cli(*args, "--format", "json")
    rows = json.loads(r.stdout)["inventory"]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["direction"] == "outbound" and row["opened_by"] == {"syn": 1} and row["flows"] == 1
    assert row["packets_sent"] == 2 and row["packets_received"] == 2
    assert row["bytes_received"] > 1000 > row["bytes"] > 100
    r = cli(*args, "--format", "csv")
    got = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(c["direction"], c["opened_by"]) for c in got] == [("outbound", "syn=1")]
    assert int(got[0]["bytes_received"]) == row["bytes_received"]
