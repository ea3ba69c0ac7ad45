"""Conntrack dump speed against `conntrack -L -o extended`, on the same 20k-entry table (root).

Makes its own network namespaces (client + peer over a veth pair, documentation addresses only),
turns on tracking there, fills the table by sending one UDP datagram to each of N ports on
203.0.113.0/24 (the peer namespace drops them; nothing leaves this machine), then times:
  * `conntrack -L -o extended > /dev/null` in that namespace (the peer: C, libnetfilter_conntrack)
  * egress-agent's dump + hand decoder (`agent.sources.conntrack.Conntrack.snapshot`)
  * pyroute2's NFCTSocket.dump() on a 2,000-entry sample (the generic parser, for reference)
and prints the ratio of the agent's entries/s to conntrack's (target >= 1/3).

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
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_conntrack needs root (network namespaces, netlink)")
    from agent.sources.conntrack import Conntrack

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


if __name__ == "__main__":
    main()
