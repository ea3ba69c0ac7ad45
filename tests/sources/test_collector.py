"""The live collector (`--source netflow`, `--source sflow`): a real agent on loopback judges what
real exporters send (softflowd's NetFlow v5/v9/IPFIX, pmacctd's sFlow) as the audit judges the
capture they describe; hand-built datagrams for loss, exporters and damage; the sFlow decoder
against the capture reader. Documentation addresses only; every datagram goes to loopback.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.sources.netflow.sflow import SflowDecoder
from tests.agent_process import Agent, free_port, wait_for
from tests.conftest import have
from tests.helpers import write_pcap
from tests.sources.test_netflow import _conversation

NO_NETNS = SimpleNamespace(client=None)
PUBLIC = ("198.51.100.0/24", "203.0.113.0/24")
# _conversation: three TCP connections and a DNS query a local host opened (to US, DE, CN; the
# query to 203.0.113.10 is covered by the policy's exception) and an inbound SSH connection
EGRESS = 4


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(tmp_path, kind: str, port: int, workers: int = 1, **config) -> Agent:
    cfg = {"sources": [kind], kind: {"listen": [f"127.0.0.1:{port}"], "workers": workers}, "attribution": False,
           "host_addresses": False, **config}
    return Agent(tmp_path, NO_NETNS, config=cfg)


def _send(port: int, datagrams):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def _audit(cli, agent: Agent, pcap) -> dict:
    pub = [x for n in PUBLIC for x in ("--public-net", n)]
    r = cli("audit", "--format", "json", "--flows", "--policies", agent.policies, "--geoip-db", agent.db, *pub, pcap)
    assert r.returncode == 1, r.stderr
    return json.loads(r.stdout)


def _same_as_audit(agent: Agent, rep: dict, kind: str, byte_metrics: bool = True):
    """The agent's verdicts and countries equal the audit's of the same capture, and (whole flow
    records: NetFlow) its bytes per country; sampled packets keep coming after a connection is
    judged, so sFlow's bytes are checked at its end (`_ends_carry_the_captures_bytes`)."""
    wait_for(lambda: agent.value("egress_agent_flows_judged_total", source=kind) == EGRESS, what="judged flows")
    assert rep["totals"]["egress_flows"] == EGRESS
    violations = {(r["flow"]["src"], r["flow"]["sport"], r["flow"]["dst"], r["flow"]["dport"])
                  for r in agent.lines() if r.get("verdict") == "violation"}
    assert violations == {(v["src"], v["sport"], v["dst"], v["dst_port"]) for v in rep["violations"]}
    for row in rep["destinations_by_country"]:
        assert agent.value("egress_agent_flows_total", policy="eu-data", country=row["country"],
                           direction="outbound") == row["flows"], row
        if byte_metrics:
            assert agent.value("egress_agent_bytes_total", policy="eu-data", country=row["country"],
                               direction="outbound") == row["bytes_sent"], row
    rec = next(r for r in agent.lines() if r.get("verdict") == "violation")
    assert rec["exporter"] == "lab" and rec["exporter_address"] == "127.0.0.1" and rec["sampled"] == 1
    assert rec["flow"]["source"] == f"{kind}:lab"


def _ends_carry_the_captures_bytes(agent: Agent, rep: dict):
    """After the agent stops: every reported connection has an `end` record with the capture's
    counters both ways (the collector hands its open connections over as it stops)."""
    want = {(f["src"], f["sport"], f["dst"], f["dport"]): (f["bytes_sent"], f["bytes_received"]) for f in rep["flows"]}
    ends = [r for r in agent.lines() if r.get("event") == "end"]
    assert {r["flow"]["dst"] for r in ends} == {v["dst"] for v in rep["violations"]} | {"203.0.113.10"}
    for r in ends:
        f = r["flow"]
        assert (f["bytes"], f["bytes_reply"]) == want[(f["src"], f["sport"], f["dst"], f["dport"])], r


@pytest.mark.skipif(not have("softflowd"), reason="softflowd is not installed (Debian: softflowd)")
@pytest.mark.parametrize("version", [5, 9, 10])
def test_netflow_from_softflowd_is_judged_as_the_audit_judges_the_capture(tmp_path, cli, version):
    pcap = write_pcap(tmp_path / "c.pcap", _conversation(time.time() - 120))
    port = _udp_port()
    a = _agent(tmp_path, "netflow", port, exporters=[{"address": "127.0.0.1", "site": "lab"}]).start()
    try:
        r = subprocess.run(["softflowd", "-r", str(pcap), "-v", str(version), "-n", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        _same_as_audit(a, _audit(cli, a, pcap), "netflow")
        # the books: a record per direction; the inbound SSH connection is judged by no policy here
        got = {o: a.value("egress_agent_exporter_records_total", exporter="lab", outcome=o)
               for o in ("connection", "merged", "not_egress", "refused")}
        assert got == {"connection": 4, "merged": 4, "not_egress": 2, "refused": 0}
        assert a.value("egress_agent_exporter_datagrams_total", exporter="lab") >= 1
        assert a.value("egress_agent_exporter_lost_records_total", exporter="lab") == 0
        rep = _audit(cli, a, pcap)
    finally:
        assert a.stop() == 0, a.logtext()
    _ends_carry_the_captures_bytes(a, rep)


@pytest.mark.skipif(not have("pmacctd"), reason="pmacct is not installed (Debian: pmacct)")
def test_sflow_from_pmacctd_is_judged_as_the_audit_judges_the_capture(tmp_path, cli):
    pcap = write_pcap(tmp_path / "c.pcap", _conversation(time.time() - 120))
    port = _udp_port()
    a = _agent(tmp_path, "sflow", port, exporters=[{"address": "127.0.0.1", "site": "lab"}]).start()
    conf = tmp_path / "pmacctd.conf"
    conf.write_text(f"daemonize: false\npcap_savefile: {pcap}\nplugins: sfprobe\n"
                    f"sfprobe_receiver: 127.0.0.1:{port}\nsampling_rate: 1\n")
    try:
        # pmacctd's exit code at the end of a savefile depends on which of its processes stops first;
        # what it sent is what counts
        r = subprocess.run(["pmacctd", "-f", str(conf)], capture_output=True, text=True, timeout=60)
        assert "Exporting flows to" in r.stdout + r.stderr, r.stdout + r.stderr
        rep = _audit(cli, a, pcap)
        _same_as_audit(a, rep, "sflow", byte_metrics=False)
        # every packet is a sample at 1 in 1: 20 of the egress connections, 2 of the SSH one
        wait_for(lambda: a.value("egress_agent_exporter_records_total", exporter="lab", outcome="merged") == 16,
                 what="every sample")
        got = {o: a.value("egress_agent_exporter_records_total", exporter="lab", outcome=o)
               for o in ("connection", "merged", "not_egress")}
        assert got == {"connection": 4, "merged": 16, "not_egress": 2}
        openers = {r["flow"]["opened_by"] for r in a.lines() if "flow" in r}
        assert openers == {"syn", "port"}  # the sampled SYNs; the DNS query by its service port
    finally:
        assert a.stop() == 0, a.logtext()
    _ends_carry_the_captures_bytes(a, rep)


# ---- hand-built datagrams -------------------------------------------------------------------

def _v5(seq: int, records, secs=None, uptime=1_000_000, rate=0, engine=0):
    secs = int(time.time()) if secs is None else secs
    body = b""
    for src, sport, dst, dport, proto, pk, by in records:
        body += struct.pack("!4s4s4sHHIIIIHHxBBBHHBBxx", socket.inet_aton(src), socket.inet_aton(dst), bytes(4), 0, 0,
                            pk, by, uptime - 2000, uptime - 1000, sport, dport, 0x1A, proto, 0, 0, 0, 0, 0)
    return struct.pack("!HHIIIIBBH", 5, len(records), uptime, secs, 0, seq, 0, engine, rate) + body


OUT = ("10.20.0.5", 40100, "203.0.113.9", 443, 6, 10, 1000)
BACK = ("203.0.113.9", 443, "10.20.0.5", 40100, 6, 12, 9000)


def test_export_loss_unknown_exporters_and_junk_are_counted_never_fatal(tmp_path):
    """A sequence gap is lost records (per exporter and as source_drops{export_loss}); junk is
    counted by kind and the collector goes on; an exporter not configured is `other`."""
    port = _udp_port()
    a = _agent(tmp_path, "netflow", port, exporters=[{"address": "192.0.2.99", "site": "elsewhere"}]).start()
    try:
        _send(port, [_v5(0, [OUT]), b"\x00\x05junk", b"\x00\x07" + bytes(30), _v5(4, [BACK])])  # 1, 2, 3 lost
        wait_for(lambda: a.value("egress_agent_exporter_records_total", exporter="other", outcome="merged") == 1,
                 what="the second record")
        assert a.value("egress_agent_exporter_lost_records_total", exporter="other") == 3
        assert a.value("egress_agent_source_drops_total", source="netflow", reason="export_loss") == 3
        assert a.value("egress_agent_collector_refused_total", kind="malformed") == 1
        assert a.value("egress_agent_collector_refused_total", kind="unknown_version") == 1
        assert a.value("egress_agent_exporter_records_total", exporter="elsewhere", outcome="connection") == 0
        assert a.value("egress_agent_flows_judged_total", source="netflow") == 1
    finally:
        assert a.stop() == 0, a.logtext()
    new, end = [r for r in a.lines() if r.get("verdict") == "violation"]  # judged, then ended at the stop
    assert (new["event"], new["flow"]["bytes"], new["flow"]["opened_by"], new["exporter"]) == ("new", 1000, "port",
                                                                                               "other")
    assert (end["event"], end["flow"]["bytes"], end["flow"]["bytes_reply"], end["flow"]["tcp_flags"]) == (
        "end", 1000, 9000, "SPA")


def test_unknown_exporters_refused_and_an_exporters_own_local_nets(tmp_path):
    """`unknown_exporters: refuse` judges nothing from an exporter not listed; a listed one's
    local_nets make its public sources local (its flows egress)."""
    port = _udp_port()
    a = _agent(tmp_path, "netflow", port, unknown_exporters="refuse").start()
    try:
        _send(port, [_v5(0, [OUT])])
        wait_for(lambda: a.value("egress_agent_exporter_records_total", exporter="other", outcome="refused") == 1,
                 what="refused record")
        assert a.value("egress_agent_flows_judged_total", source="netflow") in (None, 0)
    finally:
        a.stop()
    assert "every record will be refused" in a.logtext()
    port = _udp_port()
    own = [{"address": "127.0.0.1", "site": "dc1", "local_nets": ["198.51.100.0/25"]}]
    second = tmp_path / "second"
    second.mkdir()
    a = _agent(second, "netflow", port, exporters=own, unknown_exporters="refuse").start()
    try:
        _send(port, [_v5(0, [("198.51.100.20", 40200, "203.0.113.140", 443, 6, 1, 60)])])  # public, but dc1's
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 1, what="judged")
        assert a.value("egress_agent_flows_total", policy="eu-data", country="CN", verdict="violation") == 1
    finally:
        a.stop()


def test_a_bad_listen_address_is_exit_2_before_anything_runs(cli, tmp_path):
    common = ("--listen", f"127.0.0.1:{free_port()}", "--evidence", tmp_path / "e.jsonl", "--no-attribution",
              "--no-host-addresses")
    for bad in ("nonsense", "999.1.1.1:2055", "127.0.0.1:0", "127.0.0.1:99999", "[::1]:x"):
        r = cli("run", "--source", "netflow", "--netflow-listen", bad, *common, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "netflow.listen" in r.stderr and bad in r.stderr, r.stderr
    r = cli("run", "--source", "netflow", *common, timeout=60)
    assert r.returncode == 2 and "no listen address" in r.stderr, r.stderr
    r = cli("run", "--netflow-listen", "127.0.0.1:2055", *common, timeout=60)  # no --source netflow
    assert r.returncode == 2 and "--netflow-listen: add --source netflow" in r.stderr, r.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        r = cli("run", "--source", "sflow", "--sflow-listen", f"127.0.0.1:{port}", *common, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"sflow.listen: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr


# ---- the sFlow decoder ----------------------------------------------------------------------

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def _sample(seq: int, frame: bytes, rate: int = 10, drops: int = 0, expanded: bool = False, header: int = 128):
    hdr = frame[:header]
    rec = struct.pack("!IIII", 1, len(frame) + 4, 4, len(hdr)) + hdr + b"\0" * (-len(hdr) % 4)
    records = struct.pack("!II", 1, len(rec)) + rec
    if expanded:
        body = struct.pack("!IIIIIIIIIII", seq, 0, 3, rate, seq * rate, drops, 0, 1, 0, 2, 1) + records
        return struct.pack("!II", 3, len(body)) + body
    body = struct.pack("!IIIIIIII", seq, 3, rate, seq * rate, drops, 1, 2, 1) + records
    return struct.pack("!II", 1, len(body)) + body


def _sflow(samples, seq=1, agent="192.0.2.1"):
    return struct.pack("!II4sIIII", 5, 1, socket.inet_aton(agent), 0, seq, 1000, len(samples)) + b"".join(samples)


def test_sflow_samples_decode_like_the_capture_reader_and_loss_is_counted():
    syn = bytes(ETH / IP(src="10.20.0.5", dst="203.0.113.9") / TCP(sport=40000, dport=443, flags="S"))
    big = bytes(ETH / IP(src="203.0.113.9", dst="10.20.0.5") / TCP(sport=443, dport=40000, flags="A") / (b"x" * 1400))
    counters = struct.pack("!II", 2, 8) + bytes(8)
    d = SflowDecoder()
    got = d.datagram(_sflow([_sample(1, syn), counters, _sample(2, big, expanded=True)]), "192.0.2.1", 5.0)
    assert [(r.src, r.sport, r.dst, r.dport, r.packets, r.bytes, r.sampled) for r in got] == [
        ("10.20.0.5", 40000, "203.0.113.9", 443, 10, 400, 10),
        ("203.0.113.9", 443, "10.20.0.5", 40000, 10, 14400, 10)]  # IP length from the header, cut at 128
    assert got[0].tcp_flags & 0xFF == 0x02 and d.counts["counter_samples"] == 1 and d.lost == {}
    d.datagram(_sflow([_sample(6, syn, drops=2)]), "192.0.2.1", 6.0)  # samples 3-5 missing, 2 dropped
    assert d.lost == {"192.0.2.1": 5}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_hostile_sflow_datagrams_never_raise(junk, cut):
    syn = bytes(ETH / IP(src="10.20.0.5", dst="203.0.113.9") / TCP(sport=40000, dport=443, flags="S"))
    good = _sflow([_sample(1, syn), _sample(2, syn, expanded=True)])
    d = SflowDecoder()
    for data in (junk, good[:cut], good[:cut] + junk, struct.pack("!I", 5) + junk):
        assert len(d.datagram(data, "192.0.2.1", 0.0)) <= 2
    cut_short = SflowDecoder()
    got = cut_short.datagram(good[:cut], "192.0.2.1", 0.0)
    assert len(got) == 2 or cut_short.counts["malformed"] == 1  # a cut is noticed unless nothing was lost


def test_sflow_of_a_udp_answer_decodes_its_ports():
    pkt = bytes(ETH / IP(src="203.0.113.10", dst="10.20.0.5") / UDP(sport=53, dport=50000) / b"answer")
    (r,) = SflowDecoder().datagram(_sflow([_sample(1, pkt, rate=1)]), "192.0.2.1", 1.0)
    assert (r.proto, r.sport, r.dport, r.packets, r.bytes) == (17, 53, 50000, 1, 34)


def test_an_exporters_own_local_nets_make_a_connection_to_them_inbound(tmp_path):
    """A public peer's connection to a host in an exporter's own local_nets is inbound: judged by
    the peer's location under an inbound policy, never as egress to the exporter's own host (the
    global local_nets do not hold it; the worker must take the exporter's word, not its own)."""
    from tests.test_daemon_inbound import INBOUND_POLICY

    port = _udp_port()
    own = [{"address": "127.0.0.1", "site": "dc1", "local_nets": ["198.51.100.0/25"]}]
    a = _agent(tmp_path, "netflow", port, exporters=own)
    (a.policies / "eu-access.yaml").write_text(INBOUND_POLICY)
    a.start()
    try:
        # 203.0.113.9 (US in the test database) opens a connection to dc1's server 198.51.100.20:443
        _send(port, [_v5(0, [("203.0.113.9", 50100, "198.51.100.20", 443, 6, 10, 1000),
                             ("198.51.100.20", 443, "203.0.113.9", 50100, 6, 12, 9000)])])
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 1, what="judged")
        assert a.value("egress_agent_flows_total", policy="eu-access", country="US", direction="inbound") == 1
        assert a.value("egress_agent_flows_total", policy="eu-data", direction="outbound") in (None, 0)
    finally:
        assert a.stop() == 0, a.logtext()
    new = next(r for r in a.lines() if r.get("event") == "new")
    assert (new["direction"], new["flow"]["src"], new["flow"]["dst"]) == ("inbound", "203.0.113.9", "198.51.100.20")


def test_a_biflow_is_one_connection_with_both_directions(tmp_path):
    from tests.sources.test_netflow import _biflow, _biflow_template, _ipfix, _set

    port = _udp_port()
    a = _agent(tmp_path, "netflow", port).start()
    try:
        rec = _biflow("10.20.0.5", 40000, "203.0.113.9", 443, 4, 400, 6, 9000, start_ms=int(time.time() * 1000))
        _send(port, [_ipfix(0, [_biflow_template(), _set(257, rec)])])
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 1, what="judged")
        assert a.value("egress_agent_exporter_records_total", outcome="connection") == 1
        assert a.value("egress_agent_bytes_total", policy="eu-data", country="US") == 400
    finally:
        assert a.stop() == 0, a.logtext()
    new = next(r for r in a.lines() if r.get("event") == "new")
    assert (new["flow"]["opened_by"], new["flow"]["bytes_reply"], new["flow"]["tcp_flags_reply"]) == (
        "first-packet", 9000, "SA")


def test_enforcement_dry_run_counts_what_would_be_refused(tmp_path):
    """A live agent with `enforce: dry-run` (the switch) and a dry-run policy counts its outbound
    violations as would-refuse; compliant and exempt connections are not, and no traffic is touched."""
    from tests.agent_process import POLICY

    port = _udp_port()
    a = _agent(tmp_path, "netflow", port, enforce="dry-run")
    (a.policies / "eu-data.yaml").write_text(POLICY + "enforce: dry-run\n")
    a.start()
    try:
        _send(port, [_v5(0, [OUT, ("10.20.0.5", 40101, "198.51.100.7", 443, 6, 1, 60),
                             ("10.20.0.5", 40102, "203.0.113.10", 443, 6, 1, 60)])])
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 3, what="judged")
        assert a.value("egress_agent_enforcement_would_refuse_total", policy="eu-data", country="US") == 1
        assert a.value("egress_agent_enforcement_would_refuse_total") == 1
        assert a.value("egress_agent_enforcement_mode", policy="eu-data", mode="dry-run") == 1
        assert a.value("egress_agent_flows_total", policy="eu-data", verdict="exempt") == 1
    finally:
        assert a.stop() == 0, a.logtext()
    assert "enforcement dry-run on" in a.logtext()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def test_worker_processes_share_one_port_one_endpoint_and_one_log(tmp_path):
    """`workers: 2`: datagrams from many exporter streams (one engine id each, each from its own port)
    spread over two SO_REUSEPORT worker processes; the books and judged connections add up on the
    agent's one endpoint and one evidence log; a worker killed is started again and judging goes on;
    at stop every connection's end is written."""
    port = _udp_port()
    a = _agent(tmp_path, "netflow", port, workers=2, exporters=[{"address": "127.0.0.1", "site": "lab"}]).start()
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]

    def send_round(seq: int):
        for i, s in enumerate(senders):
            recs = [(f"10.20.{seq}.{i}", 40000 + k, "203.0.113.9", 443, 6, 1, 100) for k in range(2)]
            s.sendto(_v5(seq * 2, recs, engine=i), ("127.0.0.1", port))

    try:
        workers = _children(a.proc.pid)
        assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker, if any)
        send_round(0)
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 32, what="first round")
        import os
        import signal as sig

        worker = max(workers)
        os.kill(worker, sig.SIGKILL)
        wait_for(lambda: a.value("egress_agent_source_errors_total", source="netflow", kind="io") == 1,
                 what="the killed worker noticed")
        send_round(1)
        wait_for(lambda: a.value("egress_agent_flows_judged_total", source="netflow") == 64, what="second round")
        assert a.value("egress_agent_exporter_records_total", exporter="lab", outcome="connection") == 64
        assert a.value("egress_agent_exporter_lost_records_total", exporter="lab") == 0
        assert a.value("egress_agent_exporter_datagrams_total", exporter="lab") == 32
        assert a.value("egress_agent_source_up", source="netflow") == 1
        # the killed worker's open connections ended at once, their later counters lost: counted
        evicted = a.value("egress_agent_state_evicted_total", source="netflow")
        ended = len({(r["flow"]["src"], r["flow"]["sport"]) for r in a.lines() if r.get("event") == "end"})
        assert evicted >= 1 and ended == evicted
    finally:
        for s in senders:
            s.close()
        assert a.stop() == 0, a.logtext()
    lines = a.lines()
    ids = {r["flow"]["src"] + ":" + str(r["flow"]["sport"]) for r in lines if r.get("event") == "new"}
    ends = {r["flow"]["src"] + ":" + str(r["flow"]["sport"]) for r in lines if r.get("event") == "end"}
    assert len(ids) == 64 and ends == ids  # the killed worker's connections too, with what it had sent
    assert "ended (exit code -9); starting it again" in a.logtext()


def test_a_fault_mid_round_keeps_the_books():
    """What a round made before a fault is not lost uncounted: its record outcomes stay in the tally
    and its connections that will not reach the judge count as dropped (error)."""
    from agent.config import Config
    from agent.enrich.scope import Scoper
    from agent.sources.netflow.collect import Collecting, Exporters

    col = Collecting("netflow", Exporters(Config(), Scoper(public_nets=PUBLIC)), False)
    col.datagrams([(_v5(0, [OUT, BACK]), "192.0.2.99")], time.time())
    assert len(col.items) == 1
    tally = col.give_up()
    assert tally[("error",)] == 1 and tally[("records", "other", "connection")] == 1
    assert tally[("records", "other", "merged")] == 1 and col.items == [] and col.tally == {}


def test_datagrams_gather_between_reads_only_in_a_buffer_that_holds_them():
    """Under load a socket is read every ROUND (datagrams gather in its buffer) only where its
    buffer is large; a small one (an unprivileged agent) is read at every wake-up, not overflowed."""
    import socket

    from agent.sources.netflow.collect import ROUND, ROUND_MIN_BUFFER, round_for

    small = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert round_for([small]) == 0.0
        try:
            big.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: root only
        except PermissionError:
            pytest.skip("SO_RCVBUFFORCE needs root (CAP_NET_ADMIN)")
        assert big.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= ROUND_MIN_BUFFER
        assert round_for([big]) == ROUND and round_for([big, small]) == 0.0
    finally:
        small.close()
        big.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12), st.integers(0, 400),
       st.booleans())
def test_damaged_exports_through_the_whole_collector_never_raise_and_every_record_is_counted(flips, cut, v9):
    """Exports damaged anywhere (bytes changed, cut short) go through decoding, pairing and the
    scope read per connection without raising; every record decoded has an outcome in the tally,
    and each item carries its addresses parsed and its direction as its exporter's scope says."""
    from agent.config import Config
    from agent.enrich.scope import Scoper, ip_parse
    from agent.sources.netflow.collect import Collecting, Exporters
    from tests.sources.test_netflow import (
        _ipfix,
        _ipfix_record,
        _ipfix_template,
        _set,
        _v9,
        _v9_record,
        _v9_template,
    )

    scoper = Scoper(public_nets=PUBLIC)
    col = Collecting("netflow", Exporters(Config(), scoper), True)
    if v9:
        recs = b"".join(_v9_record(dst=f"203.0.113.{i}", sport=40000 + i) for i in range(6))
        data = bytearray(_v9(0, [_v9_template(), _set(300, recs)]))
    else:
        recs = b"".join(_ipfix_record(dst=f"198.51.100.{i}") for i in range(6))
        data = bytearray(_ipfix(0, [_ipfix_template(), _set(256, recs)]))
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[:len(data) - cut % len(data)])
    decoded = []
    decode = col.decoder.datagram
    col.decoder.datagram = lambda *a: decoded.append(len(got := decode(*a))) or got
    now = time.time()
    col.datagrams([(data, "192.0.2.99"), (data, "192.0.2.99")], now)
    col.sweep(float("inf"))
    items, tally = col.take()
    reference = Collecting("netflow", Exporters(Config(), scoper), True, c=False)  # the Python connection table
    reference.datagrams([(data, "192.0.2.99"), (data, "192.0.2.99")], now)
    reference.sweep(float("inf"))
    assert reference.take() == (items, tally)
    assert sum(n for k, n in tally.items() if k[0] == "records") == sum(decoded)
    assert tally[("datagrams", "other")] == 2
    for _kind, e, _counted in items:
        assert (e.dst_vn, e.src_vn) == (ip_parse(e.dst), ip_parse(e.src)), e
        src_public, dst_public = scoper.scope(e.src) == "public", scoper.scope(e.dst) == "public"
        assert e.inbound == src_public and src_public != dst_public, e
    assert sum(1 for kind, _e, _c in items if kind == "flow") == tally.get(("new",), 0)


@pytest.mark.parametrize("c", [True, False])
def test_a_fault_inside_the_connection_table_counts_every_record_of_its_round(c):
    """A table that fails mid-round (here a record it cannot key) gives no outcomes: each record
    of the round is counted `error` instead, and what it made already is counted dropped."""
    from agent.config import Config
    from agent.enrich.scope import Scoper
    from agent.sources.netflow import conntable
    from agent.sources.netflow.collect import Collecting, Exporters
    from agent.sources.netflow.decode import Record

    if c and conntable._conntab is None:
        pytest.skip("the C connection table is not built")
    col = Collecting("netflow", Exporters(Config(), Scoper(public_nets=PUBLIC)), False, c=c)
    good = Record(17, "10.20.0.5", 5353, "203.0.113.9", 53, 1, 80, 10.0, 10.0, 0, "192.0.2.99", None, None, None,
                  None)
    bad = good._replace(src=5, first=11.0)  # not an address text: the table cannot key it
    col.decoder.datagram = lambda *a: [good, bad]
    with pytest.raises(TypeError):
        col.datagrams([(b"", "192.0.2.99")], time.time())
    tally = col.give_up()
    assert tally[("records", "other", "error")] == 2 and tally[("datagrams", "other")] == 1
    assert not any(k[0] == "records" and k[2] != "error" for k in tally)
