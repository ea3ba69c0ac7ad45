"""Test network topologies in namespaces this process creates (root only; documentation addresses).

    client ns  ea-v0 192.0.2.1/24, 2001:db8:1::1/64 ──veth── ea-v1 192.0.2.2, 2001:db8:1::2  peer ns
    routes in the client: 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 via the peer
    the peer owns 198.51.100.7, 203.0.113.9, 203.0.113.140, 203.0.113.200 ... on its loopback, so
    TCP connections from the client complete without any packet leaving this machine.

Nothing here is sent to any address outside these namespaces. `Topology.available()` says
whether the kernel lets us build it (root, netns, veth); tests skip cleanly where it does not.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

PEER_ADDRS = ["198.51.100.7/32", "198.51.100.130/32", "203.0.113.9/32", "203.0.113.10/32", "203.0.113.11/32",
              "203.0.113.140/32", "203.0.113.200/32", "203.0.113.250/32", "2001:db8:de::7/128",
              "2001:db8:5::9/128"]

# How the agent is told to see this topology: the client's own addresses are local, the peer's public.
LOCAL_NETS = ["192.0.2.0/24", "2001:db8:1::/64"]
PUBLIC_NETS = ["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]

# A TCP server for the peer namespace: accepts on every address, port 443, and holds connections.
SERVER = """
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 443)); s.listen(512)
    held = []
    while True:
        c, _ = s.accept(); held.append(c)
threading.Thread(target=serve, args=(socket.AF_INET6, '::'), daemon=True).start()
serve(socket.AF_INET, '0.0.0.0')
"""

# A client that opens a connection and holds it (so attribution finds its socket), printing its pid.
CLIENT = """
import os, socket, sys, time
proto, dst, port, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((dst, port))
if proto == 'udp':
    s.send(b'x' * 100)
else:
    s.send(b'y' * 300)
print(os.getpid(), flush=True)
time.sleep(hold)
"""


def sh(*cmd, check=True, input=None):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, input=input)


class Topology:
    def __init__(self, prefix: str = "eat"):
        tag = uuid.uuid4().hex[:6]
        self.client, self.peer = f"{prefix}-c-{tag}", f"{prefix}-p-{tag}"
        self.v0, self.v1 = f"ea0{tag}", f"ea1{tag}"

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be built here, else why not."""
        if os.geteuid() != 0:
            return "needs root"
        probe = f"eaprobe-{uuid.uuid4().hex[:6]}"
        r = sh("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"ip netns refused: {r.stderr.strip()}"
        sh("ip", "netns", "del", probe, check=False)
        return None

    def __enter__(self):
        sh("ip", "netns", "add", self.client)
        sh("ip", "netns", "add", self.peer)
        try:
            self._build()
            # Ended TCP flows leave the table (and send DESTROY) within a second or two, not minutes.
            for key in ("close_wait", "fin_wait", "time_wait", "last_ack", "close"):
                self.run("sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_tcp_timeout_{key}=1", check=False)
        except Exception:
            self.__exit__()
            raise
        return self

    def _build(self):
        c, p = self.client, self.peer
        sh("ip", "link", "add", self.v0, "netns", c, "type", "veth", "peer", "name", self.v1, "netns", p)
        for ns, dev, a4, a6 in ((c, self.v0, "192.0.2.1/24", "2001:db8:1::1/64"),
                                (p, self.v1, "192.0.2.2/24", "2001:db8:1::2/64")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", a4, "dev", dev)
            sh("ip", "-n", ns, "addr", "add", a6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for net in ("198.51.100.0/24", "203.0.113.0/24"):
            sh("ip", "-n", c, "route", "add", net, "via", "192.0.2.2")
        sh("ip", "-n", c, "-6", "route", "add", "2001:db8::/32", "via", "2001:db8:1::2")
        for a in PEER_ADDRS:
            sh("ip", "-n", p, "addr", "add", a, "dev", "lo")

    def __exit__(self, *exc):
        for ns in (self.client, self.peer):
            sh("ip", "netns", "del", ns, check=False)

    def run(self, *cmd, ns=None, check=True, input=None):
        return sh("ip", "netns", "exec", ns or self.client, *cmd, check=check, input=input)

    def popen(self, *cmd, ns=None, **kw):
        return subprocess.Popen(["ip", "netns", "exec", ns or self.client, *cmd], **kw)

    def enable_conntrack(self, udp_timeout: int | None = None):
        """The agent's own `enable` step (nftables ct rule, accounting, timestamps) in the client."""
        from agent.enrich.scope import Scoper
        from agent.sources.conntrack.table import enable_tracking

        enable_tracking(self.client, Scoper(public_nets=PUBLIC_NETS, local_nets=LOCAL_NETS))
        if udp_timeout:
            self.run("sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_udp_timeout={udp_timeout}")

    def serve(self):
        """Start the TCP server in the peer namespace; returns the process (caller kills it)."""
        p = self.popen("python3", "-c", SERVER, ns=self.peer, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return p

    def connect(self, proto: str, dst: str, port: int = 443, hold: float = 20.0):
        """Open a connection from the client namespace and hold it; returns (process, pid)."""
        p = self.popen("python3", "-c", CLIENT, proto, dst, str(port), str(hold), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"client failed: {p.stderr.read()}")
        return p, int(line)

    def fill_udp(self, n: int, net: str = "203.0.113"):
        """n conntrack entries: one UDP datagram each to distinct (address, port) in the peer's range."""
        code = ("import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for i in range({n}):\n    s.sendto(b'x', ('{net}.%d' % (1 + i % 250), 1024 + i % 60000))\n")
        self.run("python3", "-c", code)
