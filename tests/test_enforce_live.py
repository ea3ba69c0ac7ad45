"""Enforcement end to end, as root, in network namespaces made here (documentation addresses only).

A real `egress-agent run --enforce refuse` builds its nftables table in the client namespace; real
TCP connections from there go (or do not go) to the peer namespace over a veth pair. The test MMDB
(tests/helpers.py) puts 203.0.113.0/25 in the US, 203.0.113.128/26 in CN, 198.51.100.0/25 in DE,
198.51.100.128/25 in JP (EU adequacy), 2001:db8:5::/48 in the US; the policy allows the EEA and
adequate countries, with an exception for 203.0.113.10.
"""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.enforce.nft import GRACE
from tests.agent_process import REPO, Agent, wait_for
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]

REFUSE = """\
version: 1
name: eu-data
home: [EU]
severity: high
enforce: {mode}
allow: {{jurisdictions: [EEA, EU-ADEQUATE]}}
exceptions:
  - {{id: vendor-scc, basis: scc, reference: "SCC with Example Vendor", owner: dpo@example.com,
     destinations: {{networks: [{exempt}]}}, expires: 2099-01-01}}
"""

# connect, report how it ended and how long it took
PROBE = """
import socket, sys, time
dst = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET)
s.settimeout(3)
t = time.monotonic()
try:
    s.connect((dst, 443)); r = 'ok'
except ConnectionRefusedError:
    r = 'refused'
except OSError as e:
    r = type(e).__name__
print(r, round(time.monotonic() - t, 3))
"""


# a UDP datagram to port 53 and a wait for anything back: prints how it ended
UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((sys.argv[1], 53))
try:
    s.send(b"x" * 20); s.recv(100); print("answered")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(type(e).__name__)
"""


def attempt(topo, dst):
    out = topo.run("python3", "-c", PROBE, dst).stdout.split()
    return out[0], float(out[1])


def peer_syns(topo, counter="syns") -> int:
    """SYNs (or UDP datagrams to port 53: "udps") that reached the peer namespace from the client."""
    r = topo.run("nft", "-j", "list", "counter", "inet", "eapeer", counter, ns=topo.peer)
    return next(o["counter"]["packets"] for o in json.loads(r.stdout)["nftables"] if "counter" in o)


@pytest.fixture(scope="module")
def topo():
    with Topology("eae") as t:
        t.run("nft", "-f", "-", ns=t.peer, input="table inet eapeer {\n counter syns { }\n counter udps { }\n"
              " chain in {\n  type filter hook input priority filter; policy accept;\n"
              "  udp dport 53 ip saddr 192.0.2.1 counter name udps\n"
              "  tcp flags & (syn | ack) == syn ip saddr 192.0.2.1 counter name syns\n"
              "  tcp flags & (syn | ack) == syn ip6 saddr 2001:db8:1::1 counter name syns\n }\n}\n")
        server = t.serve()
        yield t
        server.kill()
        server.wait()


def start(tmp, topo, mode="refuse", switch="refuse", exempt="203.0.113.10/32", enforcement=None):
    a = Agent(tmp, topo, config={"enforce": switch, "enforcement": {"poll_interval": 0.2, **(enforcement or {})}})
    (a.policies / "eu-data.yaml").write_text(REFUSE.format(mode=mode, exempt=exempt))
    return a.start()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO)


def tables(topo) -> str:
    return topo.run("nft", "list", "tables").stdout


def test_refused_at_the_first_syn_allowed_and_excepted_pass(topo, tmp_path):
    a = start(tmp_path, topo)
    try:
        before = peer_syns(topo)
        for dst in ("203.0.113.9", "203.0.113.140", "2001:db8:5::9"):  # US, CN, US over IPv6
            result, took = attempt(topo, dst)
            assert result == "refused" and took < 1.0, (dst, result, took)
        assert peer_syns(topo) == before, "a SYN of a refused connection left the host"
        udp = topo.run("python3", "-c", UDP, "203.0.113.140").stdout.strip()  # CN: ICMP admin-prohibited
        assert udp in ("PermissionError", "ConnectionRefusedError", "OSError"), udp
        assert peer_syns(topo, "udps") == 0, "a refused datagram left the host"
        for dst in ("198.51.100.7", "198.51.100.130", "203.0.113.10", "2001:db8:de::7", "203.0.113.200"):
            assert attempt(topo, dst)[0] == "ok", dst  # DE, JP (adequate), exception, DE, indeterminate
        assert peer_syns(topo) == before + 5
        wait_for(lambda: (a.value("egress_agent_enforcement_refused_total", policy="eu-data") or 0) >= 3,
                 what="refused counter")
        rec = wait_for(lambda: a.evidence_for("203.0.113.9", event="refused"), what="refusal evidence")[0]
        assert rec["enforcement"] == "refused" and rec["verdict"] == "violation" and rec["country"] == "US"
        assert rec["flow"]["dport"] == 443 and rec["flow"]["src"] == "192.0.2.1" and rec["policy"] == "eu-data"
        assert a.evidence_for("2001:db8:5::9", event="refused")
        assert a.value("egress_agent_enforcement_set_elements", policy="eu-data", family="ipv4") == 2
        assert a.value("egress_agent_enforcement_mode", policy="eu-data", mode="refuse") == 1
        assert a.value("egress_agent_enforcement_build_success") == 1
        r = cli("enforce", "status", "--netns", topo.client, "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        st = json.loads(r.stdout)
        assert st["table"]["owner"] and st["policies"][0]["policy"] == "eu-data"
        assert st["policies"][0]["refused"] >= 3 and st["policies"][0]["ipv4"] == 2
    finally:
        assert a.stop() == 0, a.logtext()
    assert "egress_agent_enforce" not in tables(topo)  # a clean stop removes it too


def test_dry_run_refuses_nothing_and_counts_the_same(topo, tmp_path):
    a = start(tmp_path, topo, mode="dry-run", switch="refuse")
    try:
        assert "egress_agent_enforce" not in tables(topo)
        for dst in ("203.0.113.9", "203.0.113.140", "2001:db8:5::9"):
            assert attempt(topo, dst)[0] == "ok", dst
        assert attempt(topo, "203.0.113.10")[0] == "ok"
        wait_for(lambda: (a.value("egress_agent_enforcement_would_refuse_total", policy="eu-data") or 0) >= 3,
                 what="would-refuse counter")
        time.sleep(1)
        assert a.value("egress_agent_enforcement_would_refuse_total", policy="eu-data") == 3
        assert a.value("egress_agent_enforcement_mode", policy="eu-data", mode="dry-run") == 1
    finally:
        assert a.stop() == 0, a.logtext()


def test_sigkill_leaves_nothing_refused(topo, tmp_path):
    a = start(tmp_path, topo)
    assert attempt(topo, "203.0.113.9")[0] == "refused"
    assert "egress_agent_enforce" in tables(topo)
    a.stop(signal.SIGKILL)
    wait_for(lambda: "egress_agent_enforce" not in tables(topo), timeout=5, what="the owner table gone with the agent")
    assert attempt(topo, "203.0.113.9")[0] == "ok"


def test_broken_reload_keeps_the_sets_a_good_one_replaces_them(topo, tmp_path):
    a = start(tmp_path, topo)
    try:
        assert attempt(topo, "203.0.113.9")[0] == "refused"
        (a.policies / "eu-data.yaml").write_text("version: 1\nname: eu-data\nhome: [EU]\nenforce: refuse\n"
                                                 "allow: {jurisdictions: [NOWHERE]}\n")
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: a.value("egress_agent_config_last_reload_successful") == 0, what="failed reload")
        assert attempt(topo, "203.0.113.9")[0] == "refused"
        assert attempt(topo, "198.51.100.7")[0] == "ok"
        # a good reload: the whole US range becomes an exception, so it passes from now on
        (a.policies / "eu-data.yaml").write_text(REFUSE.format(mode="refuse", exempt="203.0.113.0/25"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: attempt(topo, "203.0.113.9")[0] == "ok", what="rebuilt sets")
        assert attempt(topo, "203.0.113.140")[0] == "refused"
    finally:
        assert a.stop() == 0, a.logtext()


def test_management_and_resolver_addresses_are_never_refused(topo, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 203.0.113.140\n")
    a = start(tmp_path, topo, enforcement={"management_nets": ["203.0.113.11/32"], "resolv_conf": str(resolv)})
    try:
        assert attempt(topo, "203.0.113.9")[0] == "refused"
        assert attempt(topo, "203.0.113.11")[0] == "ok"  # US, but the management network
        assert attempt(topo, "203.0.113.140")[0] == "ok"  # CN, but the resolver
        assert "management network 203.0.113.11/32" in a.logtext()
    finally:
        assert a.stop() == 0, a.logtext()
    # and `policy check --config` refuses the policy that would catch them
    r = cli("policy", "check", str(a.policies), "--config", str(a.config))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "management network 203.0.113.11/32" in r.stderr and "resolver 203.0.113.140" in r.stderr
    assert "Traceback" not in r.stderr


NAMED = """\
version: 1
name: payroll
home: [EU]
enforce: refuse
allow: {jurisdictions: [EEA], hostnames: ["*.payroll.example"]}
trust_names: [dns]
"""

# resolve NAME at the peer's responder, then connect at once (and again every 2 ms until accepted):
# prints the first attempt's result and how long after the answer the first success came
RACE = """
import socket, struct, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[1].split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
u.sendto(q, ("192.0.2.2", 53)); r = u.recv(512); t = time.monotonic()
target, first = socket.inet_ntoa(r[-4:]), None
while time.monotonic() - t < 5:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((target, 443)); ok = True
    except ConnectionRefusedError:
        ok = False
    first = ok if first is None else first
    if ok:
        break
    time.sleep(0.002)
print(target, "ok" if first else "refused", "ok" if ok else "refused", round((time.monotonic() - t) * 1000, 1))
"""


def test_allowed_by_name_passes_after_its_dns_answer(topo, tmp_path):
    from tests.test_names_live import RESPONDER

    dns = topo.popen("python3", "-c", RESPONDER, ns=topo.peer, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a = Agent(tmp_path, topo, config={"enforce": "refuse", "sources": ["conntrack", "capture"], "attribution": False,
                                      "enforcement": {"poll_interval": 0.2, "name_ttl_floor": 2}})
    (a.policies / "eu-data.yaml").unlink()
    (a.policies / "payroll.yaml").write_text(NAMED)
    a.start()
    try:
        result, took = attempt(topo, "203.0.113.9")  # US, no name yet: the first SYN dropped, the second reset
        assert result == "refused" and took >= 0.5, (result, took)
        time.sleep(GRACE)  # that connection's grace over
        target, first, last, ms = topo.run("python3", "-c", RACE, "api.payroll.example").stdout.split()
        # a connect at once after the answer passes: at worst its first SYN waits one retransmission
        assert (target, first, last) == ("203.0.113.9", "ok", "ok"), (first, ms, a.logtext())
        print(f"allow-by-name: the first connect after the answer passed in {ms} ms")
        assert (a.value("egress_agent_enforcement_name_allowed_total") or 0) >= 1
        # a name whose answer (TTL 1 s, allowed for the 2 s floor) has run out: allowed once, refused
        # later, and the refusal's record names the destination from the capture's DNS answers
        # (kept 30 s past their TTL)
        assert topo.run("python3", "-c", RACE, "short.payroll.example").stdout.split()[2] == "ok"
        time.sleep(GRACE)
        assert attempt(topo, "203.0.113.11")[0] == "refused"
        rec = wait_for(lambda: a.evidence_for("203.0.113.11", event="refused"), what="refusal evidence")[0]
        assert rec["flow"]["hostname"] == "short.payroll.example" and rec["flow"]["hostname_source"] == "dns"
        r = cli("enforce", "status", "--netns", topo.client)
        assert r.returncode == 0 and "1 addresses allowed by name now" in r.stdout, r.stdout + r.stderr
        assert attempt(topo, "203.0.113.140")[0] == "refused"  # CN: never named
        time.sleep(2.5)  # TTL 300 s in the zone: still allowed
        assert attempt(topo, "203.0.113.9")[0] == "ok"
    finally:
        assert a.stop() == 0, a.logtext()
        dns.kill()
        dns.wait()


def test_fail_closed_keeps_refusing_without_the_agent_and_a_restart_replaces_the_table(topo, tmp_path):
    a = start(tmp_path, topo, enforcement={"fail": "closed"})
    assert attempt(topo, "203.0.113.9")[0] == "refused"
    a.stop(signal.SIGKILL)
    time.sleep(0.5)
    try:
        assert "egress_agent_enforce" in tables(topo) and attempt(topo, "203.0.113.9")[0] == "refused"
        b = Agent(tmp_path, topo, config={"enforce": "refuse", "enforcement": {"fail": "closed"}})
        (b.policies / "eu-data.yaml").write_text(REFUSE.format(mode="refuse", exempt="203.0.113.0/25"))
        b.start()
        wait_for(lambda: attempt(topo, "203.0.113.9")[0] == "ok", what="the new table in force")
        rules = topo.run("nft", "list", "chain", "inet", "egress_agent_enforce", "output").stdout
        assert rules.count("jump refuse") == 1  # replaced, not added to
        assert attempt(topo, "203.0.113.140")[0] == "refused"
        assert b.stop() == 0, b.logtext()
        assert "egress_agent_enforce" in tables(topo)  # closed: a stop leaves it too
    finally:
        topo.run("nft", "delete", "table", "inet", "egress_agent_enforce", check=False)


def test_forward_hook_refuses_for_a_gateway(tmp_path):
    """`forward: true`: a gateway refuses what its LAN hosts open, the LAN hosts untouched.

        lan 192.0.2.10/25 ── gw 192.0.2.1/25 | 192.0.2.129/25 ── peer 192.0.2.130/25 (+ 203.0.113.9, 198.51.100.7)
    """
    from types import SimpleNamespace

    from tests.netns import SERVER, sh

    tag = uuid.uuid4().hex[:6]
    lan, gw, peer = f"eaf-l-{tag}", f"eaf-g-{tag}", f"eaf-p-{tag}"
    try:
        for ns in (lan, gw, peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"fa{tag}", "netns", lan, "type", "veth", "peer", "name", f"fb{tag}", "netns", gw)
        sh("ip", "link", "add", f"fc{tag}", "netns", gw, "type", "veth", "peer", "name", f"fd{tag}", "netns", peer)
        for ns, dev, addr in ((lan, f"fa{tag}", "192.0.2.10/25"), (gw, f"fb{tag}", "192.0.2.1/25"),
                              (gw, f"fc{tag}", "192.0.2.129/25"), (peer, f"fd{tag}", "192.0.2.130/25")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", lan, "route", "add", "default", "via", "192.0.2.1")
        for net in ("203.0.113.0/24", "198.51.100.0/24"):
            sh("ip", "-n", gw, "route", "add", net, "via", "192.0.2.130")
        sh("ip", "-n", peer, "route", "add", "192.0.2.0/25", "via", "192.0.2.129")
        for a in ("203.0.113.9/32", "198.51.100.7/32"):
            sh("ip", "-n", peer, "addr", "add", a, "dev", "lo")
        sh("ip", "netns", "exec", gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        server = subprocess.Popen(["ip", "netns", "exec", peer, "python3", "-c", SERVER],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lan_topo = SimpleNamespace(run=lambda *cmd, **kw: sh("ip", "netns", "exec", lan, *cmd, **kw))
        time.sleep(0.5)
        a = Agent(tmp_path, SimpleNamespace(client=gw),
                  config={"enforce": "refuse", "attribution": False, "host_addresses": False,
                          "enforcement": {"forward": True, "poll_interval": 0.2}})
        (a.policies / "eu-data.yaml").write_text(REFUSE.format(mode="refuse", exempt="203.0.113.10/32"))
        a.start()
        try:
            result, took = attempt(lan_topo, "203.0.113.9")  # US, from a LAN host through the gateway
            assert result == "refused" and took < 1.0, (result, took)
            assert attempt(lan_topo, "198.51.100.7")[0] == "ok"  # DE
            rec = wait_for(lambda: a.evidence_for("203.0.113.9", event="refused"), what="refusal evidence")[0]
            assert rec["flow"]["src"] == "192.0.2.10"
        finally:
            assert a.stop() == 0, a.logtext()
            server.kill()
            server.wait()
    finally:
        for ns in (lan, gw, peer):
            sh("ip", "netns", "del", ns, check=False)


def test_refuse_without_cap_net_admin_is_a_clear_start_up_error(tmp_path):
    """An unprivileged agent asked to refuse stops at start with exit 2 and one line saying why."""
    import shutil

    from tests.agent_process import free_port

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="ea-unprivileged-"))  # pytest's folders are root's alone
    shared.chmod(0o777)  # nobody writes its evidence here
    (shared / "p.yaml").write_text(REFUSE.format(mode="refuse", exempt="203.0.113.10/32"))
    (shared / "p.yaml").chmod(0o644)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent",
                        "run", "--policies", str(shared), "--enforce", "refuse", "--source", "netflow",
                        "--netflow-listen", f"127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{free_port()}",
                        "--evidence", str(shared / "evidence.jsonl"), "--no-host-addresses",
                        "--no-attribution"], capture_output=True, text=True, cwd=REPO, timeout=60)
    shutil.rmtree(shared, ignore_errors=True)
    assert r.returncode == 2, r.stderr
    assert "enforcement:" in r.stderr and "CAP_NET_ADMIN" in r.stderr and "Traceback" not in r.stderr
