"""The daemon judges inbound connections when a policy asks for them: real connections in namespaces.

A public peer (the peer namespace, binding a documentation address) opens TCP and UDP connections
to a local host (the client namespace, where the agent watches conntrack); the agent must judge each
once, by the peer's location, with `direction="inbound"` on the metrics, and count it in the books
against the kernel's own counter of inbound connections. Outbound connections stay outbound, and a
reply is never a connection of its own. Documentation addresses only.
"""

import json
import signal
import subprocess
import time

import pytest

from tests.agent_process import Agent, wait_for
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]

INBOUND_POLICY = """\
version: 1
name: eu-access
home: [EU]
severity: critical
directions: [inbound]
allow: {jurisdictions: [EEA]}
"""

# Serves TCP port 2222 and UDP port 5353... in the client namespace: answers every datagram.
LISTEN = """
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', 2222)); s.listen(64); held = []
    while True:
        c, _ = s.accept(); c.sendall(b'hello' * 20); held.append(c)
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 7777))
    while True:
        data, peer = u.recvfrom(2048); u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
tcp()
"""

# From the peer namespace, bound to a public documentation address: one TCP, one UDP exchange.
DIAL = """
import socket, sys, time
src = sys.argv[1]
t = socket.socket(); t.bind((src, 0)); t.settimeout(5); t.connect(('192.0.2.1', 2222)); t.recv(100)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((src, 0)); u.settimeout(5)
u.sendto(b'q' * 50, ('192.0.2.1', 7777)); u.recvfrom(2048)
time.sleep(3)
"""


@pytest.fixture
def topo():
    with Topology("eai") as t:
        yield t


def agent_with_inbound(tmp_path, topo) -> Agent:
    topo.enable_conntrack(udp_timeout=60)
    a = Agent(tmp_path, topo)
    (a.policies / "eu-access.yaml").write_text(INBOUND_POLICY)
    return a


def test_inbound_connections_are_judged_once_by_the_peers_location(topo, tmp_path):
    a = agent_with_inbound(tmp_path, topo).start()
    server = topo.popen("python3", "-c", LISTEN, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        # 203.0.113.9 is in the test database's US block, 198.51.100.7 in its DE block
        for src in ("203.0.113.9", "198.51.100.7"):
            topo.run("python3", "-c", DIAL, src, ns=topo.peer)
        v = a.value
        wait_for(lambda: v("egress_agent_flows_total", policy="eu-access", direction="inbound") == 4,
                 what="four inbound connections judged by eu-access")
        assert v("egress_agent_violations_total", policy="eu-access", country="US", direction="inbound") == 2
        assert v("egress_agent_flows_total", policy="eu-access", verdict="compliant", country="DE") == 2
        # outbound-only policies leave inbound connections alone; replies are not connections
        assert v("egress_agent_flows_total", policy="eu-data", direction="inbound") in (None, 0)
        assert v("egress_agent_flows_total", direction="outbound") in (None, 0)
        # the books balance against the kernel's counter, inbound connections included
        wait_for(lambda: v("egress_agent_kernel_flows_total") == 4 and v("egress_agent_flows_unaccounted") == 0
                 and v("egress_agent_flows_judged_total") == 4, what="books to balance at 4")
        recs = [r for r in a.lines() if r.get("policy") == "eu-access"]
        assert len(recs) == 2 and {r["flow"]["src"] for r in recs} == {"203.0.113.9"}
        assert {r["flow"]["dst"] for r in recs} == {"192.0.2.1"}
        assert all("inbound peer 203.0.113.9" in r["message"] for r in recs), recs[0]["message"]
        assert {r["direction"] for r in recs} == {"inbound"}
        assert {r["flow"]["dport"] for r in recs} == {2222, 7777}
        # an outbound connection beside them is judged outbound, by the outbound policy
        topo.serve()
        p, _ = topo.connect("tcp", "203.0.113.9", hold=3)
        wait_for(lambda: v("egress_agent_violations_total", policy="eu-data", direction="outbound") == 1,
                 what="the outbound connection judged outbound")
        assert v("egress_agent_flows_total", policy="eu-access", direction="inbound") == 4
        assert {r["direction"] for r in a.lines() if r.get("policy") == "eu-data"} == {"outbound"}
        p.kill()
    finally:
        server.kill()
        assert a.stop() == 0, a.logtext()


def test_a_reload_that_drops_the_inbound_policy_stops_judging_inbound(topo, tmp_path):
    """The kernel side follows the policies: without an inbound policy the filter and the counter
    leave inbound connections out again, and the books still balance."""
    a = agent_with_inbound(tmp_path, topo).start()
    server = topo.popen("python3", "-c", LISTEN, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        (a.policies / "eu-access.yaml").unlink()
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "rebuilt from the new scope table" in a.logtext(), what="rescope")
        topo.run("python3", "-c", DIAL, "203.0.113.9", ns=topo.peer)
        topo.fill_udp(5)
        v = a.value
        wait_for(lambda: v("egress_agent_flows_judged_total") == 5 and v("egress_agent_flows_unaccounted") == 0,
                 what="the five outbound flows alone judged")
        assert v("egress_agent_flows_total", direction="inbound") in (None, 0)
        assert v("egress_agent_source_events_total", event="new") == 5  # inbound ones filtered in the kernel
        cfg = json.loads(a.config.read_text())
        assert cfg["source"]["enable"] is True
    finally:
        server.kill()
        assert a.stop() == 0, a.logtext()
