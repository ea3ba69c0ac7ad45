"""Names on live flows (root, network namespaces, documentation addresses only): the daemon with
`sources: [conntrack, capture]` names conntrack's flows from DNS answers and TLS ClientHellos it
sees on the client's interface, and learns the host's own addresses with pyroute2.

    client ns 192.0.2.1 ──veth── 192.0.2.2 peer ns: a DNS responder on :53, the TCP server on :443
"""

import subprocess
import time

import pytest

from tests.agent_process import Agent, wait_for
from tests.names import build
from tests.netns import Topology
from tests.register_fixtures import payroll

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]

# name -> (address, TTL): a one-question A responder, by hand (the peer runs plain python3)
RESPONDER = """
import socket, struct
ZONE = {b"api.payroll.example": ("203.0.113.9", 300), b"x.payroll.example": ("203.0.113.10", 300),
        b"short.payroll.example": ("203.0.113.11", 1)}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
while True:
    q, peer = s.recvfrom(512)
    off, labels = 12, []
    while q[off]:
        labels.append(q[off + 1:off + 1 + q[off]]); off += 1 + q[off]
    name, question = b".".join(labels), q[12:off + 5]
    addr, ttl = ZONE.get(name, ("203.0.113.250", 60))
    head = q[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
    answer = b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, ttl, 4) + socket.inet_aton(addr)
    s.sendto(head + question + answer, peer)
"""

# resolve NAME at the peer's responder (or use an address), connect to :443, send HELLO (hex), hold
CLIENT = """
import socket, struct, sys, time
target, hello, bind = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
if not target[0].isdigit():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in target.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
    u.sendto(q, ("192.0.2.2", 53)); r = u.recv(512)
    target = socket.inet_ntoa(r[-4:])
s = socket.socket(); s.settimeout(3)
if bind:
    s.bind((bind, 0))
try:
    s.connect((target, 443)); s.send(hello or b"y" * 300)
except OSError:
    pass  # the SYN made the conntrack entry; that is what is judged
print(target, flush=True)
time.sleep(10)
"""

POLICY = """\
version: 1
name: payroll
home: [EU]
severity: high
allow:
  jurisdictions: [EEA]
  hostnames: ["*.payroll.example"]
trust_names: [dns]  # answers to queries the capture saw may excuse; SNI may not
"""


@pytest.fixture(scope="module")
def topo():
    with Topology() as t:
        server = t.serve()
        dns = t.popen("python3", "-c", RESPONDER, ns=t.peer, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        yield t
        for p in (server, dns):
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def agent(topo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    a = Agent(tmp, topo, config={"sources": ["conntrack", "capture"], "attribution": False,
                                 "capture": {"name_wait": 0.5, "dns_grace": 0}})
    (a.policies / "eu-data.yaml").unlink()
    (a.policies / "payroll.yaml").write_text(POLICY)
    a.start()
    yield a
    rc = a.stop()
    assert rc == 0, a.logtext()


def connect(topo, target, hello=b"", bind=""):
    p = topo.popen("python3", "-c", CLIENT, target, hello.hex(), bind, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(p.stderr.read())
    return p, line.strip()


def test_dns_name_makes_a_us_address_compliant(topo, agent):
    before = agent.value("egress_agent_flows_total", policy="payroll", verdict="compliant", country="US") or 0
    p, addr = connect(topo, "api.payroll.example")
    try:
        assert addr == "203.0.113.9"
        wait_for(lambda: (agent.value("egress_agent_flows_total", policy="payroll", verdict="compliant",
                                      country="US") or 0) > before, what="compliant by name")
        assert (agent.value("egress_agent_flows_named_total", source="dns") or 0) >= 1
    finally:
        p.kill()
    assert not agent.evidence_for("203.0.113.9", verdict="violation")


def test_sni_wins_over_dns_and_names_the_evidence(topo, agent):
    p, addr = connect(topo, "x.payroll.example", build.records(build.client_hello("files.vendor.example")))
    try:
        rec = wait_for(lambda: agent.evidence_for(addr, verdict="violation"), what="violation evidence")[0]
    finally:
        p.kill()
    assert (rec["flow"]["hostname"], rec["flow"]["hostname_source"]) == ("files.vendor.example", "sni")
    assert rec["message"].startswith(f"destination {addr} (files.vendor.example, from TLS SNI; US")


def test_quic_initial_names_a_udp_flow(topo, agent):
    from agent.names import quic

    initial = build.seal_initial(b"\x05" * 8, build.crypto_frame(0, build.client_hello("video.vendor.example")),
                                 version=quic.V2)
    topo.run("python3", "-c", "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             f"s.sendto(bytes.fromhex('{initial.hex()}'), ('203.0.113.250', 443))")
    rec = wait_for(lambda: agent.evidence_for("203.0.113.250"), what="evidence for the QUIC flow")[0]
    assert (rec["flow"]["proto"], rec["flow"]["hostname"], rec["flow"]["hostname_source"]) == \
        ("udp", "video.vendor.example", "quic-sni")


def test_expired_answer_no_longer_names_a_new_flow(topo, agent):
    p, addr = connect(topo, "short.payroll.example")  # TTL 1 s, grace 0: named now ...
    p.kill()
    wait_for(lambda: (agent.value("egress_agent_flows_total", policy="payroll", verdict="compliant",
                                  country="US") or 0) >= 2, what="first flow compliant")
    time.sleep(2.5)
    p, _ = connect(topo, addr)  # ... and not 2.5 s later: the same address is outside EEA again
    try:
        rec = wait_for(lambda: agent.evidence_for(addr, verdict="violation"), what="violation evidence")[0]
    finally:
        p.kill()
    assert "hostname" not in rec["flow"]


def test_public_host_address_is_local_without_local_net(topo, agent):
    topo.run("ip", "addr", "add", "198.51.100.10/32", "dev", "lo")
    topo.run("ip", "route", "add", "198.51.100.10/32", "via", "192.0.2.1", ns=topo.peer)
    wait_for(lambda: "host's addresses changed" in agent.logtext(), what="address change seen")
    wait_for(lambda: "reloaded" in agent.logtext(), what="reload after the change")
    p, _ = connect(topo, "203.0.113.140", bind="198.51.100.10")  # CN
    try:
        rec = wait_for(lambda: agent.evidence_for("203.0.113.140", verdict="violation"), what="violation")[0]
    finally:
        p.kill()
    assert rec["flow"]["src"] == "198.51.100.10"


def test_capture_without_cap_net_raw_is_a_clear_start_up_error(topo, tmp_path):
    import sys

    from tests.agent_process import REPO

    a = Agent(tmp_path, topo, config={"sources": ["conntrack", "capture"], "attribution": False})
    r = subprocess.run(["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw", sys.executable, "-m", "agent",
                        "run", "--config", str(a.config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "needs CAP_NET_RAW" in r.stderr and "Traceback" not in r.stderr


def test_flows_from_capture_alone(topo, tmp_path):
    """No conntrack: the capture's first packets are the flows, named by the same extractor."""
    a = Agent(tmp_path, topo, config={"sources": ["capture"], "attribution": False, "capture": {"name_wait": 0.3}})
    a.start()
    try:
        assert a.value("egress_agent_source_up", source="conntrack") is None  # not a source here: no false alarm
        p, _ = connect(topo, "203.0.113.140", build.records(build.client_hello("cn.vendor.example")))
        p.kill()
        topo.run("python3", "-c", "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                                  "[s.sendto(b'x' * 50, ('203.0.113.200', 5000)) for _ in range(5)]")
        recs = wait_for(lambda: a.evidence_for("203.0.113.140", verdict="violation"), what="evidence from capture")
        rec = recs[0]
        assert rec["flow"]["source"] == "capture" and "conntrack_id" not in rec
        assert (rec["flow"]["hostname"], rec["flow"]["hostname_source"]) == ("cn.vendor.example", "sni")
        # five datagrams of one UDP 5-tuple are one flow (203.0.113.200 is registered-only: indeterminate)
        udp = wait_for(lambda: a.evidence_for("203.0.113.200"), what="udp flow")
        time.sleep(1)
        assert len({r["seq"] for r in a.evidence_for("203.0.113.200")}) == len(udp) == 1
        assert a.value("egress_agent_flows_judged_total", source="capture") >= 2
    finally:
        assert a.stop() == 0, a.logtext()


def test_daemon_counts_recipients_and_names_undeclared_ones(topo, tmp_path):
    (tmp_path / "reg.yaml").write_text(payroll(transfer_policy=None))
    a = Agent(tmp_path, topo, config={"sources": ["conntrack", "capture"], "attribution": False,
                                      "recipients": str(tmp_path / "reg.yaml"), "capture": {"name_wait": 0.3}})
    (a.policies / "eu-data.yaml").unlink()
    (a.policies / "payroll.yaml").write_text(POLICY.replace("hostnames: [\"*.payroll.example\"]", "networks: []"))
    a.start()
    try:
        for name in ("api.payroll.example", "files.tracker.example", "cdn.tracker.example"):
            p, _ = connect(topo, "203.0.113.9", build.records(build.client_hello(name)))
            p.kill()
        wait_for(lambda: len([r for r in a.evidence_for("203.0.113.9") if r["flow"].get("hostname")]) >= 3,
                 what="the three named flows judged")
        assert a.value("egress_agent_recipient_flows_total", recipient="payroll") >= 1
        assert a.value("egress_agent_recipient_flows_total", recipient="undeclared") >= 2
        # two tracker.example names are one recipient, counted and logged once; flows of earlier tests
        # still in the namespace's conntrack table may add their own (the start-up dump judges them)
        assert a.logtext().count("undeclared recipient host:tracker.example") == 1
        assert a.value("egress_agent_undeclared_recipients_total") == a.logtext().count("undeclared recipient ")
        rec = wait_for(lambda: [r for r in a.evidence_for("203.0.113.9") if r.get("recipient")],
                       what="evidence naming the recipient")[0]
        assert rec["recipient"]["id"] == "payroll" and rec["flow"]["hostname"] == "api.payroll.example"
        # after a restart, a recipient already named is not named (nor counted for the alert) again
        assert a.stop() == 0, a.logtext()
        a.start()
        p, _ = connect(topo, "203.0.113.9", build.records(build.client_hello("www.tracker.example")))
        p.kill()
        wait_for(lambda: len([r for r in a.evidence_for("203.0.113.9")
                              if r["flow"].get("hostname") == "www.tracker.example"]) >= 1, what="judged again")
        assert a.logtext().count("undeclared recipient host:tracker.example") == 1
        assert a.value("egress_agent_undeclared_recipients_total") == 0
    finally:
        assert a.stop() == 0, a.logtext()


# A forged DNS answer from the peer's resolver address, port 53, to a closed port of the client:
# no query was asked. Sent through a raw UDP socket (the responder holds port 53).
SPOOF = """
import socket, struct
name = b"".join(bytes([len(p)]) + p for p in b"api.payroll.example".split(b".")) + b"\\0"
dns = struct.pack(">HHHHHH", 99, 0x8180, 1, 1, 0, 0) + name + struct.pack(">HH", 1, 1)
dns += b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 600, 4) + socket.inet_aton("203.0.113.11")
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
s.sendto(struct.pack(">HHHH", 53, 40999, 8 + len(dns), 0) + dns, ("192.0.2.1", 0))
"""


def test_a_forged_answer_is_counted_and_names_nothing(topo, agent):
    """The spoofed-answer probe: a US flow stays a violation, the answer counts as unsolicited."""
    before = agent.value("egress_agent_name_events_total", kind="dns_unsolicited") or 0
    topo.run("python3", "-c", SPOOF, ns=topo.peer)
    wait_for(lambda: (agent.value("egress_agent_name_events_total", kind="dns_unsolicited") or 0) > before,
             what="the forged answer counted")
    seen = len(agent.evidence_for("203.0.113.11", verdict="violation", event="new"))
    p, addr = connect(topo, "203.0.113.11")  # US; the forged answer called it api.payroll.example
    try:
        recs = wait_for(lambda: agent.evidence_for(addr, verdict="violation", event="new")[seen:],
                        what="violation evidence")
    finally:
        p.kill()
    assert recs[-1]["flow"].get("hostname") is None
