"""The live daemon end to end, as root, in network namespaces made here (documentation addresses only).

A real `egress-agent run` watches the conntrack table of a client namespace; real TCP and UDP
connections go from there to a peer namespace over a veth pair. Nothing leaves the machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_process import REPO, Agent, wait_for
from tests.helpers import build_city_mmdb
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]

@pytest.fixture(scope="module")
def topo():
    with Topology() as t:
        server = t.serve()
        yield t
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def agent(topo, tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("agent"), topo).start()
    yield a
    rc = a.stop()
    assert rc == 0, a.logtext()


def test_violation_in_metrics_and_evidence_with_process(topo, agent):
    client, pid = topo.connect("tcp", "203.0.113.9")
    try:
        wait_for(lambda: (agent.value("egress_agent_violations_total", policy="eu-data", severity="high",
                                      country="US") or 0) >= 1, what="violation metric")
        rec = wait_for(lambda: agent.evidence_for("203.0.113.9", verdict="violation"), what="evidence line")[0]
    finally:
        client.kill()
    assert rec["policy"] == "eu-data" and len(rec["policy_sha256"]) == 64 and rec["reason"] == "outside-allowed"
    assert rec["country"] == "US" and rec["asn"] == 16509 and rec["location"]["source"] == "GeoIP2-City"
    assert rec["flow"]["proto"] == "tcp" and rec["flow"]["dport"] == 443 and rec["flow"]["src"] == "192.0.2.1"
    proc = rec["flow"]["process"]
    assert proc["pid"] == pid and proc["comm"].startswith("python") and proc["uid"] == 0 and proc["user"] == "root"
    assert "203.0.113.9" in rec["message"] and rec["conntrack_id"]
    assert (agent.value("egress_agent_flows_total", policy="eu-data", verdict="violation", country="US") or 0) >= 1


def test_udp_and_ipv6_violations(topo, agent):
    before = agent.value("egress_agent_violations_total", policy="eu-data", country="CN") or 0
    udp, _ = topo.connect("udp", "203.0.113.140", port=53, hold=5)
    tcp6, _ = topo.connect("tcp", "2001:db8:5::9", hold=5)
    try:
        wait_for(lambda: (agent.value("egress_agent_violations_total", policy="eu-data", country="CN") or 0) > before,
                 what="UDP violation")
        rec = wait_for(lambda: agent.evidence_for("2001:db8:5::9", verdict="violation"), what="IPv6 evidence")[0]
        assert rec["country"] == "US"
        assert agent.evidence_for("203.0.113.140")[0]["flow"]["proto"] == "udp"
    finally:
        udp.kill()
        tcp6.kill()


def test_compliant_flow_leaves_no_evidence(topo, agent):
    c, _ = topo.connect("tcp", "198.51.100.7", hold=3)
    try:
        wait_for(lambda: (agent.value("egress_agent_flows_total", verdict="compliant", country="DE") or 0) >= 1,
                 what="compliant flow")
    finally:
        c.kill()
    assert not agent.evidence_for("198.51.100.7")


def test_exempt_flow_names_its_exception(topo, agent):
    c, _ = topo.connect("tcp", "203.0.113.10", hold=3)
    try:
        rec = wait_for(lambda: agent.evidence_for("203.0.113.10", verdict="exempt"), what="exempt evidence")[0]
    finally:
        c.kill()
    assert rec["exception"] == "vendor-scc" and "SCC with Example Vendor" in rec["message"]
    assert (agent.value("egress_agent_flows_total", verdict="exempt") or 0) >= 1


def test_unmapped_range_is_indeterminate(topo, agent):
    c, _ = topo.connect("tcp", "203.0.113.250", hold=3)
    try:
        wait_for(lambda: agent.value("egress_agent_indeterminate_total", policy="eu-data",
                                     reason="unknown-location:no-record"), what="indeterminate metric")
        rec = wait_for(lambda: agent.evidence_for("203.0.113.250", verdict="indeterminate"), what="evidence")[0]
    finally:
        c.kill()
    assert rec["country"] is None and rec["location"]["unknown_reason"] == "no-record"


def test_bytes_are_counted_when_a_flow_ends(topo, agent):
    c, _ = topo.connect("tcp", "203.0.113.11", hold=0.5)
    c.wait(timeout=10)
    # Expiry is paced by the kernel's garbage collector; deleting the entry sends the same DESTROY
    # event, with the final counters, at once.
    topo.run("conntrack", "-D", "-p", "tcp", "-d", "203.0.113.11", check=False)
    rec = wait_for(lambda: agent.evidence_for("203.0.113.11", event="end"), timeout=30, what="end-of-flow evidence")[0]
    assert rec["flow"]["bytes"] > 300 and rec["flow"]["packets"] >= 3
    assert (agent.value("egress_agent_bytes_total", policy="eu-data", verdict="violation", country="US") or 0) > 300


def test_metrics_have_bounded_labels_and_pass_promtool(agent):
    text = agent.scrape()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for k, v in s.labels.items():
                assert k not in ("ip", "dst", "src", "port", "pid", "host", "hostname")
                assert "203.0.113" not in v and "192.0.2" not in v and "2001:db8" not in v
    for name in ("egress_agent_source_up", "egress_agent_sampling_ratio", "egress_agent_conntrack_tracking",
                 "egress_agent_conntrack_accounting", "egress_agent_geoip_database_build_timestamp_seconds",
                 "egress_agent_policies_loaded", "egress_agent_config_last_reload_successful",
                 "egress_agent_exception_expiry_timestamp_seconds", "egress_agent_build_info"):
        assert name in text, name
    assert agent.value("egress_agent_conntrack_accounting", source="conntrack") == 1
    assert agent.value("egress_agent_sampling_ratio", source="conntrack") == 1
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_sighup_with_broken_policy_keeps_the_old_set(topo, agent):
    broken = agent.policies / "broken.yaml"
    broken.write_text("version: 1\nname: broken\nhome: [EUU]\nallow: {jurisdictions: [EU]}\n")
    try:
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.value("egress_agent_config_last_reload_successful") == 0, what="failed reload")
        assert "keeping the policies in force" in agent.logtext() and "EUU" in agent.logtext()
        before = agent.value("egress_agent_violations_total", policy="eu-data", country="CN") or 0
        c, _ = topo.connect("tcp", "203.0.113.140", hold=3)
        wait_for(lambda: (agent.value("egress_agent_violations_total", policy="eu-data", country="CN") or 0) > before,
                 what="old policy still judging")
        c.kill()
    finally:
        broken.unlink()
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.value("egress_agent_config_last_reload_successful") == 1, what="good reload")


def test_geoip_database_swap_takes_effect(topo, agent, tmp_path):
    new = build_city_mmdb(tmp_path / "new.mmdb", {"203.0.113.0/24": {"country": "IN"}})  # no adequacy
    os.replace(new, agent.db)  # what geoipupdate does: a new file renamed over the old one
    time.sleep(1.5)
    c, _ = topo.connect("tcp", "203.0.113.250", port=443, hold=3)
    try:
        rec = wait_for(lambda: [r for r in agent.evidence_for("203.0.113.250", verdict="violation")],
                       what="violation after database swap")[0]
    finally:
        c.kill()
    assert rec["country"] == "IN"
    assert "GeoIP database changed" in agent.logtext()


def test_audit_conntrack_snapshot_uses_the_same_engine(topo, agent):
    c, _ = topo.connect("tcp", "203.0.113.9", hold=10)
    try:
        time.sleep(0.5)
        r = subprocess.run([sys.executable, "-m", "agent", "audit", "--conntrack", "--netns", topo.client,
                            "--format", "json", "--policies", str(agent.policies), "--geoip-db", str(agent.db),
                            "--local-net", "192.0.2.0/24", "--public-net", "203.0.113.0/24"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    finally:
        c.kill()
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["inputs"][0]["format"] == "conntrack"
    assert any(v["dst"] == "203.0.113.9" and v["policy"] == "eu-data" for v in rep["violations"])


def test_overflow_resynchronises_and_restart_loses_no_evidence(topo, tmp_path):
    a = Agent(tmp_path, topo, rcvbuf=2048).start()
    try:
        topo.fill_udp(3000, net="203.0.113")  # a bounded burst of new flows into a tiny buffer
        wait_for(lambda: (a.value("egress_agent_source_events_lost_total") or 0) >= 1, what="lost events counted")
        # the flows are still open, so the resynchronising dump finds every one: nothing is lost
        wait_for(lambda: a.value("egress_agent_flows_judged_total") == 3000, timeout=40, what="all 3000 judged")
        wait_for(lambda: a.value("egress_agent_kernel_flows_total") == 3000, what="the kernel's count read")
        assert a.value("egress_agent_source_flows_recovered_total") > 0
        wait_for(lambda: a.value("egress_agent_flows_unaccounted") == 0, what="unaccounted back to 0")
        assert a.value("egress_agent_source_drops_total", reason="overflow") == 0
        assert a.proc.poll() is None and a.value("egress_agent_source_up", source="conntrack") == 1
        a.stop(signal.SIGKILL)
        assert a.evidence.read_bytes().endswith(b"\n")  # no torn line after SIGKILL
        n_before = len(a.lines())  # every line of every file parses
        assert n_before > 0
        # While the agent is down, a connection opens and stays open.
        c, pid = topo.connect("tcp", "203.0.113.140", port=443, hold=20)
        try:
            a.start()
            rec = wait_for(lambda: [r for r in a.evidence_for("203.0.113.140", verdict="violation", event="open")
                                    if r["flow"]["proto"] == "tcp" and r["flow"]["process"].get("pid") == pid],
                           timeout=30, what="flow found by the start-up dump")[0]
            assert rec["flow"]["process"]["pid"] == pid
            gaps = [r for r in a.lines() if r.get("event") == "gap"]
            assert len(gaps) == 1 and gaps[0]["reason"] == "unclean-stop"  # the kill -9 outage is marked
            assert a.value("egress_agent_evidence_gaps_total") == 1
        finally:
            c.kill()
        assert len(a.lines()) > n_before
        assert a.stop() == 0
    finally:
        a.stop(signal.SIGKILL)


def test_dump_bigger_than_the_queue_is_judged_not_dropped(topo, tmp_path):
    topo.fill_udp(1500, net="198.51.100")  # compliant DE/JP flows, still in the table
    a = Agent(tmp_path, topo)
    cfg = json.loads(a.config.read_text())
    cfg["queue_size"] = 256
    a.config.write_text(json.dumps(cfg))
    a.start()
    try:
        wait_for(lambda: (a.value("egress_agent_flows_total", policy="eu-data") or 0) >= 1500, timeout=30,
                 what="every dumped flow judged")
        assert (a.value("egress_agent_source_drops_total", reason="queue_full") or 0) == 0
    finally:
        assert a.stop() == 0


def test_metrics_beyond_loopback_without_protection_is_warned(topo, tmp_path):
    a = Agent(tmp_path, topo)
    cfg = json.loads(a.config.read_text())
    cfg["listen"] = f"0.0.0.0:{a.port}"
    a.config.write_text(json.dumps(cfg))
    a.start()
    try:
        assert "without TLS or basic auth" in a.logtext()
        # a web config with basic auth, taken on SIGHUP, closes the endpoint to anonymous scrapes
        import bcrypt

        h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
        (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{h}'\n")
        cfg["web_config"] = str(tmp_path / "web.yml")
        a.config.write_text(json.dumps(cfg))
        a.proc.send_signal(signal.SIGHUP)
        import urllib.error
        import urllib.request

        def refused():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/metrics", timeout=2)
            except urllib.error.HTTPError as e:
                return e.code == 401
            return False
        wait_for(refused, what="401 after the reload")
    finally:
        assert a.stop() == 0, a.logtext()
