"""Conntrack dump speed against `conntrack -L -o extended`, on the same 20k-entry table (root).

Makes its own network namespaces (client + peer over a veth pair, documentation addresses only),
turns on tracking there, fills the table by sending one UDP datagram to each of N ports on
203.0.113.0/24 (the peer namespace drops them; nothing leaves this machine), then times:
  * `conntrack -L -o extended > /dev/null` in that namespace (the peer: C, libnetfilter_conntrack)
  * egress-agent's dump + hand decoder (`agent.sources.conntrack.Conntrack.snapshot`)
  * pyroute2's NFCTSocket.dump() on a 2,000-entry sample (the generic parser, for reference)
and prints the ratio of the agent's entries/s to conntrack's (target >= 1/3). Then it runs the real
daemon on that namespace (attribution on, test GeoIP database, shipped policies) while a sender
opens --rate new UDP flows per second for --seconds, and prints the daemon's CPU use (user+system
from /proc) per 1,000 new flows per second.

    sudo python bench/bench_conntrack.py [--entries 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import Topology  # noqa: E402


def best(fn, runs=3):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=1000, help="new flows per second for the CPU measurement")
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_conntrack needs root (network namespaces, netlink)")
    from agent.sources.conntrack.table import Conntrack

    with Topology("eabench") as topo:
        topo.enable_conntrack(udp_timeout=900)
        topo.fill_udp(a.entries)
        count = int(topo.run("conntrack", "-C").stdout.strip())
        print(f"conntrack table in {topo.client}: {count:,} entries")

        def ct_tool():
            subprocess.run(["ip", "netns", "exec", topo.client, "conntrack", "-L", "-o", "extended"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

        # The peer pays `ip netns exec` + process start-up; measure that floor and subtract it.
        floor = best(lambda: subprocess.run(["ip", "netns", "exec", topo.client, "true"], check=True), 5)
        t_tool = best(ct_tool) - floor
        ct = Conntrack(topo.client)
        got = []
        t_agent = best(lambda: got.append(len(ct.snapshot())))
        ct.close()
        print(f"conntrack -L -o extended  {t_tool * 1e3:8.1f} ms  {count / t_tool:>10,.0f} entries/s  "
              f"(process start-up {floor * 1e3:.1f} ms subtracted)")
        print(f"egress-agent dump+decode  {t_agent * 1e3:8.1f} ms  {got[-1] / t_agent:>10,.0f} entries/s")
        try:
            from pyroute2 import NFCTSocket

            s = NFCTSocket(netns=topo.client)
            n = 0
            t = time.perf_counter()
            for _ in s.dump():
                n += 1
                if n >= 2000:
                    break
            dt = time.perf_counter() - t
            s.close()
            print(f"pyroute2 NFCTSocket.dump  {dt / n * 1e6:8.1f} us/entry (first {n:,} entries)")
        except Exception as e:  # reference only; never fail the bench on it
            print(f"pyroute2 reference skipped: {e}")
        print(f"ratio to conntrack -L: {(got[-1] / t_agent) / (count / t_tool):.2f}  (target >= 0.33)")
        daemon_cpu(topo, a.rate, a.seconds, attribution=True)
        daemon_cpu(topo, a.rate, a.seconds, attribution=False)


SENDER = """
import socket, sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic(); n = 0
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while n < due:
        s.sendto(b'x', ('198.51.100.%d' % (1 + n % 250), 20000 + n // 250 % 40000)); n += 1
    time.sleep(0.002)
print(n)
"""


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(topo, rate: int, seconds: float, attribution: bool = True):
    import json
    import socket
    import tempfile
    import urllib.request

    from tests.helpers import build_asn_mmdb, build_city_mmdb

    tmp = Path(tempfile.mkdtemp(prefix="ea-cpu-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "agent.yaml"
    cfg.write_text(json.dumps({
        "policies": str(REPO / "policies"),
        "geoip_databases": [build_city_mmdb(tmp / "c.mmdb"), build_asn_mmdb(tmp / "a.mmdb")],
        "listen": f"127.0.0.1:{port}", "local_nets": ["192.0.2.0/24"],
        "public_nets": ["198.51.100.0/24", "203.0.113.0/24"], "evidence": {"path": str(tmp / "ev.jsonl")},
        "source": {"netns": topo.client}, "attribution": attribution}))
    topo.run("conntrack", "-F", check=False)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        sent = int(topo.run("python3", "-c", SENDER, str(rate), str(seconds)).stdout)
        time.sleep(1.0)  # let the worker drain
        c1, t1 = cpu_seconds(agent.pid), time.monotonic()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        events = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('egress_agent_source_events_total{') and 'event="new"' in line)
        util = (c1 - c0) / (t1 - t0)
        per_k = util * 100 / (sent / seconds / 1000)
        print(f"daemon: {sent:,} new flows in {seconds:.0f} s ({sent / seconds:,.0f}/s), {events:,.0f} NEW events "
              f"seen; attribution {'on' if attribution else 'off'}: CPU {util * 100:.1f}% of one core = "
              f"{per_k:.1f}% per 1,000 new flows/s")
    finally:
        agent.terminate()
        agent.wait(timeout=20)


if __name__ == "__main__":
    main()
