"""The command line as users run it: report contract, exit codes, and clear errors for bad input."""

import json

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw, raw

from tests.helpers import write_pcap

DOC_PUBLIC = ["--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32"]


def eth(p):
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p)


@pytest.fixture
def capture(tmp_path):
    t = 1750000000.0  # 2025-06-15
    frames = [
        (t, eth(IP(src="10.0.0.5", dst="198.51.100.7") / TCP(sport=40000, dport=443) / Raw(bytes(100)))),  # DE
        (t + 1, eth(IP(src="10.0.0.5", dst="198.51.100.7") / TCP(sport=40000, dport=443))),
        (t + 2, eth(IP(src="10.0.0.5", dst="203.0.113.9") / TCP(sport=40001, dport=443) / Raw(bytes(60)))),  # US
        (t + 3, eth(IP(src="10.0.0.5", dst="203.0.113.140") / UDP(sport=40002, dport=53))),  # CN
        (t + 4, eth(IP(src="10.0.0.5", dst="203.0.113.200") / UDP(sport=40003, dport=53))),  # FR registered only
        (t + 5, eth(IP(src="10.0.0.5", dst="10.0.0.1") / UDP(sport=40004, dport=53))),  # local
        (t + 6, eth(IP(src="203.0.113.9", dst="10.0.0.5") / TCP(sport=443, dport=40001))),  # the reply to t + 2
        (t + 7, eth(IPv6(src="fd00::5", dst="2001:db8:5::1") / TCP(sport=40005, dport=443))),  # US v6
    ]
    return write_pcap(tmp_path / "cap.pcap", frames)


def audit_json(cli, *args):
    r = cli("audit", "--format", "json", *DOC_PUBLIC, *args)
    assert r.returncode in (0, 1), r.stderr
    assert "Traceback" not in r.stderr
    return r, json.loads(r.stdout)


def test_audit_report_contract(cli, capture, city_db, asn_db):
    r, rep = audit_json(cli, "--geoip-db", city_db, "--geoip-db", asn_db, capture)
    assert r.returncode == 1
    assert rep["inputs"][0] | {"path": None} == rep["inputs"][0] | {
        "path": None, "format": "pcap", "link_types": ["ethernet"], "packets": 8, "malformed": 0, "truncated": False}
    assert [g["database_type"] for g in rep["geoip"]] == ["GeoIP2-City", "GeoLite2-ASN"]
    assert {p["name"] for p in rep["policies"]} >= {"gdpr-personal-data"}
    assert all(len(p["sha256"]) == 64 for p in rep["policies"])
    # seven one-way flows, six connections: the reply at t + 6 is part of the connection at t + 2,
    # never an inbound connection of its own
    assert rep["totals"] == {"packets": 8, "bytes": rep["totals"]["bytes"], "flows": 6, "egress_flows": 5,
                             "inbound_flows": 0}
    by = {d["country"]: d for d in rep["destinations_by_country"]}
    assert by["DE"] == {"country": "DE", "distinct_dst": 1, "flows": 1, "packets": 2, "bytes": 180, "packets_sent": 2,
                        "bytes_sent": 180, "packets_received": 0, "bytes_received": 0}
    us = by["US"]  # the connection to 203.0.113.9 with its reply, and the IPv6 one
    assert (us["flows"], us["packets_sent"], us["packets_received"], us["bytes_received"]) == (2, 2, 1, 40)
    assert by["US"]["distinct_dst"] == 2 and by["CN"]["flows"] == 1 and by[None]["flows"] == 1
    assert set(rep["verdicts"]) == {"compliant", "violation", "exempt", "indeterminate", "not_applicable"}
    gdpr = [v for v in rep["violations"] if v["policy"] == "gdpr-personal-data"]
    assert {v["dst"] for v in gdpr} == {"203.0.113.9", "203.0.113.140", "2001:db8:5::1"}
    v = next(v for v in gdpr if v["dst"] == "203.0.113.9")
    for key in ("policy", "severity", "reason", "src", "dst", "dst_port", "proto", "country", "packets", "bytes",
                "first_seen", "last_seen"):
        assert key in v
    assert (v["country"], v["dst_port"], v["proto"], v["packets"], v["bytes"]) == ("US", 443, "tcp", 1, 100)
    assert v["first_seen"] == "2025-06-15T15:06:42Z"
    ind = [x for x in rep["indeterminate"] if x["policy"] == "gdpr-personal-data"]
    assert [(x["dst"], x["reason"]) for x in ind] == [("203.0.113.200", "unknown-location:registered-country-only")]


def test_no_violation_exits_0_and_output_file(cli, tmp_path, city_db):
    pkt = eth(IP(src="10.0.0.5", dst="198.51.100.7") / TCP(sport=1, dport=443))
    p = write_pcap(tmp_path / "ok.pcap", [(1750000000.0, pkt)])
    out = tmp_path / "report.json"
    r = cli("audit", "--format", "json", "--output", out, *DOC_PUBLIC, "--geoip-db", city_db, p)
    assert r.returncode == 0 and r.stdout == ""
    assert json.loads(out.read_text())["verdicts"]["compliant"] >= 1


def test_table_output_names_violations(cli, capture, city_db):
    r = cli("audit", *DOC_PUBLIC, "--geoip-db", city_db, capture)
    assert r.returncode == 1
    assert "Violations" in r.stdout and "203.0.113.9" in r.stdout and "gdpr-personal-data" in r.stdout


def test_jsonl_replay_gives_the_same_verdicts(cli, tmp_path, capture, city_db):
    _, rep = audit_json(cli, "--geoip-db", city_db, capture)
    lines = [json.dumps({"proto": v["proto"], "src": v["src"], "sport": v["sport"], "dst": v["dst"],
                         "dport": v["dst_port"], "packets": v["packets"], "bytes": v["bytes"],
                         "first_seen": v["first_seen"], "last_seen": v["last_seen"]})
             for v in rep["violations"] if v["policy"] == "gdpr-personal-data"]
    flows = tmp_path / "flows.jsonl"
    flows.write_text("\n".join(lines) + "\n")
    r, rep2 = audit_json(cli, "--geoip-db", city_db, flows)
    assert r.returncode == 1
    assert rep2["inputs"][0]["format"] == "jsonl"
    key = lambda v: (v["policy"], v["dst"], v["reason"])  # noqa: E731
    assert sorted(map(key, rep2["violations"])) == sorted(map(key, rep["violations"]))


def test_truncated_jsonl_keeps_what_came_before(cli, tmp_path, city_db):
    f = tmp_path / "cut.jsonl"
    f.write_text('{"proto": "tcp", "src": "10.0.0.5", "dst": "203.0.113.9", "dport": 443, "first_seen": 1750000000}\n'
                 '{"proto": "tcp", "src": "10.0.0.5", "dst": "203.0')
    r, rep = audit_json(cli, "--geoip-db", city_db, f)
    assert rep["inputs"][0]["truncated"] is True and rep["totals"]["egress_flows"] == 1
    assert "cut.jsonl:2: last line is cut off at byte offset" in r.stderr


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"\x7fELF\x02\x01\x01" + bytes(100), "unknown file format"),
    (b'{"proto": "tcp", "src": "10.0.0.5", "dst": "nope"}\n', "bad.bin:1: dst: 'nope' is not an IP address"),
    (b'{"proto": "tcp", "src": "10.0.0.5", "dst": "203.0.113.9", "dport": 70000}\n', "bad.bin:1: dport"),
    (b'{"proto": "tcp"}\n{oops\n', "bad.bin:1: src: missing field"),
])
def test_bad_inputs_exit_2_without_traceback(cli, tmp_path, content, message):
    f = tmp_path / "bad.bin"
    f.write_bytes(content)
    r = cli("audit", f)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_truncated_capture_warns_with_offset(cli, tmp_path, capture):
    data = open(capture, "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-5])
    r = cli("audit", "--format", "json", cut)
    rep = json.loads(r.stdout)
    assert rep["inputs"][0]["truncated"] is True and rep["inputs"][0]["packets"] == 7
    assert "cut.pcap: truncated at byte offset" in r.stderr


def test_usage_errors(cli, tmp_path):
    assert cli("audit").returncode == 2
    assert cli("audit", tmp_path / "missing.pcap").returncode == 2
    r = cli("audit", "--local-net", "not-a-net", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("audit", "--geoip-db", tmp_path / "none.mmdb", tmp_path)
    assert r.returncode == 2 and "GeoIP database not found" in r.stderr


def test_folder_input(cli, tmp_path, capture, city_db):
    r, rep = audit_json(cli, "--geoip-db", city_db, tmp_path)
    assert len(rep["inputs"]) == 1 and rep["totals"]["packets"] == 8


def test_lookup_json(cli, city_db, asn_db):
    r = cli("lookup", "--format", "json", "--geoip-db", city_db, "--geoip-db", asn_db, *DOC_PUBLIC,
            "198.51.100.7", "64:ff9b::cb00:7109", "10.1.1.1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for key in ("ip", "scope", "country", "registered_country", "represented_country", "continent", "in_eu",
                "asn", "as_org", "jurisdictions", "source"):
        assert key in rows[0]
    assert rows[0]["country"] == "DE" and rows[0]["asn"] == 24940
    assert rows[0]["jurisdictions"] == ["CH-ADEQUATE", "EEA", "EU", "UK-ADEQUATE"]
    assert rows[1]["country"] == "US" and rows[1]["lookup_ip"] == "203.0.113.9"
    assert rows[2]["scope"] == "private" and rows[2]["country"] is None
    assert cli("lookup", "not-an-ip").returncode == 2


def test_policy_check_and_test_exit_codes(cli, tmp_path):
    assert cli("policy", "check").returncode == 0
    r = cli("policy", "test")
    assert r.returncode == 0 and r.stdout.strip().endswith("0 failed")
    (tmp_path / "p.yaml").write_text("version: 1\nname: p\nhome: [EUU]\nallow: {jurisdictions: [EU, XX]}\n")
    r = cli("policy", "check", tmp_path)
    assert r.returncode == 2 and "p.yaml:3: home[0]: unknown jurisdiction 'EUU'" in r.stderr
    assert "p.yaml:4: allow.jurisdictions[1]" in r.stderr
    (tmp_path / "p.yaml").write_text("version: 1\nname: p\nhome: [EU]\nallow: {jurisdictions: [EU]}\n")
    (tmp_path / "p.test.yaml").write_text("locations: {203.0.113.9: {country: US}}\n"
                                          "cases: [{name: n, flow: {dst: 203.0.113.9}, expect: compliant}]\n")
    r = cli("policy", "test", tmp_path)
    assert r.returncode == 1 and "FAIL" in r.stdout and "0 passed, 1 failed" in r.stdout
    assert json.loads(cli("policy", "schema").stdout)["title"].startswith("egress-agent")


def test_shipped_policies_are_the_default_outside_the_repo(cli, tmp_path, capture):
    r = cli("policy", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "gdpr-personal-data" in r.stdout
    r = cli("audit", "--format", "json", capture, cwd=tmp_path)
    assert r.returncode in (0, 1), r.stderr
    assert {p["name"] for p in json.loads(r.stdout)["policies"]} >= {"gdpr-personal-data", "sovereign-operator"}


def test_piped_text_reports_are_whole_lines(cli, capture, city_db):
    """Piped or redirected, no line is wrapped or cut: a verdict sentence is one greppable line."""
    r = cli("audit", "--flows", *DOC_PUBLIC, "--geoip-db", city_db, capture)
    msgs = [line.strip() for line in r.stdout.splitlines() if "no exception applies" in line]
    assert msgs and all(m.startswith("destination ") and m.endswith(")") for m in msgs), r.stdout
    assert "…" not in r.stdout
    assert any("2001:db8:5::1:443" in line for line in r.stdout.splitlines())  # the flows table, full width


def test_an_80_column_terminal_gets_flows_one_per_entry_and_no_cut_address(cli, capture, city_db, tmp_path):
    import io

    from rich.console import Console

    r = cli("audit", "--format", "json", "--flows", *DOC_PUBLIC, "--geoip-db", city_db, capture)
    from agent.sinks.report import AuditReport

    rep = AuditReport([], [], with_flows=True)
    rep.flows = json.loads(r.stdout)["flows"]
    out = io.StringIO()
    rep._render_flows(Console(file=out, width=80, force_terminal=True, color_system=None))
    text = out.getvalue()
    assert "…" not in text and "┃" not in text  # no squeezed table
    for f in rep.flows:
        assert f"{f['src']}:{f['sport']} -> {f['dst']}:{f['dport']}" in text


def test_a_capture_where_no_local_host_is_recognised_is_not_a_silent_pass(cli, tmp_path):
    """The host has a public address: every connection is public -> public, nothing is egress. The
    audit says so, names the busiest opener and the --local-net to pass; --strict makes it exit 2."""
    t = 1750000000.0
    frames = [(t + i, eth(IPv6(src="2001:db8:77::5", dst="2001:db8:5::1") / TCP(sport=40000 + i, dport=443, flags="S")))
              for i in range(3)] + [(t + 9, eth(IPv6(src="2001:db8:5::1", dst="2001:db8:77::5") /
                                                TCP(sport=443, dport=40000, flags="SA")))]
    cap = write_pcap(tmp_path / "public.pcap", frames)
    r = cli("audit", "--public-net", "2001:db8::/32", cap)
    assert r.returncode == 0
    assert "3 connection(s) read, none judged: no local host was recognised" in r.stderr
    assert "2001:db8:77::5 (3 connection(s))" in r.stderr and "--local-net 2001:db8:77::/64" in r.stderr
    r = cli("audit", "--strict", "--public-net", "2001:db8::/32", cap)
    assert r.returncode == 2 and "audit --strict: 3 connection(s) read, none judged" in r.stderr
    r = cli("audit", "--strict", "--public-net", "2001:db8::/32", "--local-net", "2001:db8:77::/64", cap)
    assert r.returncode in (0, 1) and "none judged" not in r.stderr


def test_a_wrong_flag_after_a_subcommand_shows_that_subcommands_usage(cli):
    r = cli("audit", "--bogus", "examples/demo.pcap")
    assert r.returncode == 2 and "usage: egress-agent audit" in r.stderr and "--bogus" in r.stderr
    r = cli("policy", "check", "--nope")
    assert r.returncode == 2 and "usage: egress-agent policy check" in r.stderr


def test_violations_are_summed_up_by_policy_country_and_recipient_first(cli, capture, city_db):
    r = cli("audit", *DOC_PUBLIC, "--geoip-db", city_db, capture)
    out = r.stdout
    head = out.index("Violations by policy, country and recipient")
    assert head < out.index("Violations: ") < out.index("no exception applies")
    row = next(line for line in out.splitlines()[out[:head].count("\n"):] if "gdpr-personal-data" in line)
    assert "US" in row and "outbound" in row
