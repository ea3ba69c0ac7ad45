"""Who opened each connection: the audit's answer against the kernel's (root, network namespaces,
documentation addresses only).

Real TCP (IPv4 and IPv6), UDP and ICMP connections are opened in both directions between the client
namespace and the peer namespace of `tests/netns.py` while tcpdump records the client's interface
and `conntrack -E` records every new connection's original direction. Two connections are opened
before tcpdump starts, so the capture misses their handshakes; two datagrams go to closed ports, so
the answers are ICMP port unreachables, which belong to them. For every connection the kernel
saw, the audit's connection (`agent.connections` over the capture) must be opened by the same side
to the same port.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import time

import pytest

from agent.connections import connections
from agent.sources.capfile.reader import read_capture
from agent.wire.netlink import in_netns
from tests.netns import Topology

WHY = Topology.available()
MISSING = [t for t in ("tcpdump", "conntrack", "nft") if shutil.which(t) is None]
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}"),
              pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}")]

CLIENT4, CLIENT6 = "192.0.2.1", "2001:db8:1::1"
PEERS = {"203.0.113.9", "203.0.113.10", "203.0.113.11", "2001:db8:5::9"}


def _sock(ns: str, fam, kind, bind=None, proto=0):
    with in_netns(ns):
        s = socket.socket(fam, kind, proto)
    s.settimeout(5)
    if bind is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
    return s


def _tcp_pair(server: socket.socket, ns: str, fam, dst, bind=None):
    c = _sock(ns, fam, socket.SOCK_STREAM, bind)
    c.connect(dst)
    a, _ = server.accept()
    a.settimeout(5)
    return c, a


def _echo_request(ns: str, dst: str, ident: int, src: str | None = None):
    s = _sock(ns, socket.AF_INET, socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
    if src:
        s.bind((src, 0))
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"egress-agent"
    csum = sum(struct.unpack(f"!{len(body) // 2}H", body))
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (dst, 0))
    s.recv(512)  # the kernel's echo reply
    s.close()


def _kernel_openers(lines: list[str]) -> dict:
    """(proto, endpoints) -> (src, sport, dst, dport) of each new connection's original direction."""
    out = {}
    for line in lines:
        m = re.search(r"\[NEW\]\s+(\w+)\s+(\d+)\s.*?src=(\S+) dst=(\S+)(?: sport=(\d+) dport=(\d+))?", line)
        if not m:
            continue
        proto, src, dst = int(m[2]), m[3], m[4]
        if not ({src, dst} & PEERS):
            continue
        sport, dport = int(m[5] or 0), int(m[6] or 0)
        out[(proto, frozenset([(src, sport), (dst, dport)]))] = (src, sport, dst, dport)
    return out


def test_the_audit_names_the_opener_the_kernel_names(tmp_path):
    pcap = tmp_path / "client.pcap"
    with Topology("eac") as topo:
        topo.enable_conntrack()
        events = topo.popen("conntrack", "-E", "-e", "NEW", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
        time.sleep(0.5)
        c, p = topo.client, topo.peer
        s_out = _sock(p, socket.AF_INET, socket.SOCK_STREAM, ("203.0.113.9", 8443))
        s_out6 = _sock(p, socket.AF_INET6, socket.SOCK_STREAM, ("2001:db8:5::9", 8443))
        s_db = _sock(c, socket.AF_INET, socket.SOCK_STREAM, (CLIENT4, 5432))  # a service on the client
        s_ssh = _sock(c, socket.AF_INET, socket.SOCK_STREAM, (CLIENT4, 2222))  # an unlisted port
        for s in (s_out, s_out6, s_db, s_ssh):
            s.listen(8)
        u_peer = _sock(p, socket.AF_INET, socket.SOCK_DGRAM, ("203.0.113.9", 40000))
        u_client = _sock(c, socket.AF_INET, socket.SOCK_DGRAM, (CLIENT4, 40001))
        # opened before the capture starts: it sees neither handshake
        late_out = _tcp_pair(s_out, c, socket.AF_INET, ("203.0.113.9", 8443))
        late_in = _tcp_pair(s_db, p, socket.AF_INET, (CLIENT4, 5432), bind=("203.0.113.10", 0))
        dump = topo.popen("tcpdump", "-i", topo.v0, "-U", "-s", "256", "-w", str(pcap),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while (not pcap.exists() or pcap.stat().st_size < 24) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # tcpdump writes its header before its filter is attached
        try:
            late_in[1].send(b"rows" * 50)  # the local server speaks first: only the port rule is right
            late_in[0].recv(1024)
            late_in[0].send(b"ok")
            late_out[0].send(b"more" * 50)
            late_out[1].recv(1024)
            late_out[1].send(b"fine")
            late_out[0].recv(64)
            for pair in (_tcp_pair(s_out, c, socket.AF_INET, ("203.0.113.9", 8443)),
                         _tcp_pair(s_ssh, p, socket.AF_INET, (CLIENT4, 2222), bind=("203.0.113.11", 0)),
                         _tcp_pair(s_out6, c, socket.AF_INET6, ("2001:db8:5::9", 8443))):
                pair[0].send(b"hello" * 40)
                pair[1].recv(1024)
                pair[1].send(b"answer" * 100)
                pair[0].recv(4096)
                pair[0].close()
                pair[1].close()
            # UDP both ways: a client's ephemeral port to the peer's 40000, the peer's to the client's 40001
            u = _sock(c, socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"ask", ("203.0.113.9", 40000))
            data, back = u_peer.recvfrom(64)
            u_peer.sendto(b"answer", back)
            u.recv(64)
            v = _sock(p, socket.AF_INET, socket.SOCK_DGRAM, ("203.0.113.10", 0))
            v.sendto(b"ask", (CLIENT4, 40001))
            data, back = u_client.recvfrom(64)
            u_client.sendto(b"answer", back)
            v.recv(64)
            # to closed ports both ways: the answer is the other kernel's ICMP port unreachable, which
            # conntrack relates to the datagram (no connection of its own) and so must the audit
            w = _sock(c, socket.AF_INET, socket.SOCK_DGRAM)
            w.sendto(b"anyone?", ("203.0.113.11", 9))
            x = _sock(p, socket.AF_INET, socket.SOCK_DGRAM, ("203.0.113.11", 0))
            x.sendto(b"anyone?", (CLIENT4, 7))
            time.sleep(0.3)
            _echo_request(c, "203.0.113.9", 0x1234)
            _echo_request(p, CLIENT4, 0x4321, src="203.0.113.10")
            for s in (*late_out, *late_in):
                s.close()
            time.sleep(1.0)
        finally:
            dump.terminate()
            dump.wait(10)
            events.terminate()
            kernel = _kernel_openers(events.communicate(timeout=10)[0].splitlines())
    assert len(kernel) == 11, sorted(kernel.values())  # 5 TCP, 4 UDP, 2 ICMP (errors are RELATED)
    audit = {}
    for f in connections(read_capture(str(pcap), names=False).table).flows():
        if {f.src, f.dst} & PEERS:
            audit[(f.proto, frozenset([(f.src, f.sport), (f.dst, f.dport)]))] = (f.src, f.sport, f.dst, f.dport,
                                                                               f.opened_by)
    assert set(audit) == set(kernel), (audit, kernel)
    disagree = {k: (audit[k], kernel[k]) for k in kernel if audit[k][:4] != kernel[k]}
    assert not disagree, disagree
    how = sorted(v[4] for v in audit.values())
    assert how == sorted(["port", "port", "syn", "syn", "syn", "first-packet", "first-packet", "icmp-echo",
                          "icmp-echo", "icmp-error", "icmp-error"]), how
    assert not any(f.proto == 1 and f.opened_by == "icmp-error" for f in
                   connections(read_capture(str(pcap), names=False).table).flows())  # no error on its own
