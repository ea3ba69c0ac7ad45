"""Live judging speed and loss against `conntrack -E`, on a flow-heavy stream (root).

Makes its own namespaces (client + peer over a veth pair; documentation addresses only, nothing
leaves this machine), then for each rate in --rates: a sender in the client opens that many new
UDP flows per second for --seconds, every one to a *distinct* IPv6 destination in 2001:db8::/32
(a test MMDB spreads them over 16 countries, so every flow needs its own GeoIP lookup). While it
runs, two consumers read the same conntrack event stream:

  * egress-agent run      (shipped policies, evidence on, attribution off, then on)
  * conntrack -E -e NEW   (the peer: libnetfilter_conntrack in C, printing each event)

and the bench prints, per rate: flows the kernel counted, flows judged, drops by reason,
unaccounted, each consumer's CPU (% of one core), CPU per 1,000 new flows/s, the share of the
agent's CPU spent in the kernel (system time: its recv, write and netlink work), the agent's
capacity (flows judged per CPU-second) and the CPU ratio agent / conntrack -E; then the agent's CPU
by thread (the daemon names its threads `ea-...`), per flow judged.

    sudo .venv/bin/python bench/bench_live.py [--rates 2000,10000,30000] [--seconds 8]

Targets (issue 7): >= 50,000 flows per CPU-second without attribution, <= 3% of a core per
1,000 new flows/s, and zero unaccounted loss up to the rate where the kernel reports loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import LOCAL_NETS, PUBLIC_NETS, Topology  # noqa: E402

PROFILE = None  # --profile PREFIX
COUNTRIES = ["DE", "FR", "US", "CN", "JP", "GB", "NL", "IE", "SG", "BR", "IN", "RU", "CA", "AU", "SE", "CH"]

SENDER = """
import random, socket, sys, time
rate, seconds, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
start = time.monotonic(); n = 0
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while n < due:
        # 2001:db8:X???:: with X != 0 (2001:db8:1::/64 is the client's own network)
        hi = rnd.randrange(0x1000, 0x10000)
        dst = '2001:db8:%x:%x:%x:%x::1' % (hi, rnd.getrandbits(16), rnd.getrandbits(16), rnd.getrandbits(16))
        s.sendto(b'x', (dst, 443)); n += 1
    time.sleep(0.001)
print(n)
"""


def cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """User + system CPU seconds of a process (system only with kernel_only)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict:
    """CPU seconds (user + system) per thread name (the daemon names its threads `ea-...`)."""
    out: dict = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def metrics(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + s.labels["reason"] + "}" if "reason" in s.labels else "")
            out[key] = out.get(key, 0) + s.value
    return out


def build_mmdb(path: Path):
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country", languages=["en"],
                   description="bench")
    for i, cc in enumerate(COUNTRIES):
        w.insert_network(IPSet([f"2001:db8:{i:x}000::/36"]),
                         {"country": {"iso_code": cc, "names": {"en": cc}}, "continent": {"code": "EU"}})
    w.to_db_file(str(path))


def run_rate(topo, work: Path, rate: int, seconds: float, attribution: bool, seed: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = work / "agent.yaml"
    cfg.write_text(json.dumps({
        "policies": str(REPO / "policies"), "geoip_databases": [str(work / "bench.mmdb")],
        "listen": f"127.0.0.1:{port}", "local_nets": LOCAL_NETS, "public_nets": PUBLIC_NETS,
        "evidence": {"path": str(work / f"ev-{rate}-{attribution}.jsonl"), "max_bytes": 1 << 30},
        "source": {"netns": topo.client, "enable": True}, "attribution": attribution}))
    topo.run("conntrack", "-F", check=False)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "ab"))
    peer = None
    try:
        for _ in range(200):
            try:
                if metrics(port).get("egress_agent_loss_accounting") == 1:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        peer = subprocess.Popen(["ip", "netns", "exec", topo.client, "conntrack", "-E", "-e", "NEW"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        m0 = metrics(port)
        a0, p0, t0 = cpu_seconds(agent.pid), cpu_seconds(peer.pid), time.monotonic()
        k0 = cpu_seconds(agent.pid, kernel_only=True)
        th0 = thread_cpu(agent.pid)
        spy = None
        if PROFILE:  # sample the agent's threads while the sender runs (py-spy, collapsed stacks)
            spy = subprocess.Popen(["py-spy", "record", "-p", str(agent.pid), "-d", str(int(seconds)), "-r", "200",
                                    "--format", "raw", "-o", f"{PROFILE}-{rate}-{int(attribution)}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sent = int(topo.run("python3", "-c", SENDER, str(rate), str(seconds), str(seed)).stdout)
        if spy is not None:
            spy.wait(timeout=60)
        dt = time.monotonic() - t0
        # let the agent drain its queue and settle its books (judged work still counts as its CPU)
        for _ in range(60):
            time.sleep(0.5)
            m1 = metrics(port)
            if m1.get("egress_agent_flows_queued", 0) == 0 and m1.get("egress_agent_flows_unaccounted", 1) == 0:
                break
        a1, p1 = cpu_seconds(agent.pid), cpu_seconds(peer.pid)
        k1 = cpu_seconds(agent.pid, kernel_only=True)
        th1 = thread_cpu(agent.pid)
        m1 = metrics(port)
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=10)
        agent.terminate()
        agent.wait(timeout=30)

    def d(k):
        return m1.get(k, 0) - m0.get(k, 0)

    return {"rate": rate, "sent": sent, "wall": dt, "kernel": d("egress_agent_kernel_flows_total"),
            "judged": d("egress_agent_flows_judged_total"),
            "drops": {r: d(f"egress_agent_source_drops_total{{{r}}}")
                      for r in ("sampled", "rate_limited", "queue_full", "overflow", "error")},
            "lost_events": d("egress_agent_source_events_lost_total"),
            "unaccounted": m1.get("egress_agent_flows_unaccounted"), "agent_cpu": a1 - a0, "agent_kernel_cpu": k1 - k0,
            "peer_cpu": p1 - p0, "threads": {k: v - th0.get(k, 0.0) for k, v in th1.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="2000,10000,30000")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy the agent; collapsed stacks to PREFIX-RATE-ATTR.txt")
    ap.add_argument("--no-attribution-pass", action="store_true", help="skip the pass with attribution on")
    ap.add_argument("--only-attribution-pass", action="store_true", help="only the pass with attribution on")
    a = ap.parse_args()
    global PROFILE
    PROFILE = a.profile
    if os.geteuid() != 0:
        raise SystemExit("bench_live needs root (network namespaces, netlink, nftables)")
    work = Path(tempfile.mkdtemp(prefix="ea-live-"))
    build_mmdb(work / "bench.mmdb")
    rates = [int(x) for x in a.rates.split(",")]
    print(f"{os.cpu_count()} CPUs; sender, agent, conntrack -E and the kernel share them")
    with Topology("ealive") as topo:
        topo.enable_conntrack(udp_timeout=2)
        passes = (False,) if a.no_attribution_pass else (True,) if a.only_attribution_pass else (False, True)
        for attribution in passes:
            print(f"\n--- attribution {'on' if attribution else 'off'} ---")
            print(f"{'offered/s':>10} {'kernel':>8} {'judged':>8} {'drops':>24} {'unacct':>6} "
                  f"{'agent %':>8} {'%/1k/s':>7} {'kernel %':>8} {'flows/cpu-s':>11} {'ct -E %':>8} {'%/1k/s':>7} "
                  f"{'ratio':>6}")
            for i, rate in enumerate(rates):
                r = run_rate(topo, work, rate, a.seconds, attribution, seed=i)
                per_s = r["kernel"] / r["wall"]
                a_util = r["agent_cpu"] / r["wall"] * 100
                p_util = r["peer_cpu"] / r["wall"] * 100
                drops = ",".join(f"{k}={int(v)}" for k, v in r["drops"].items() if v) or "0"
                cap = r["judged"] / r["agent_cpu"] if r["agent_cpu"] else float("inf")
                k_share = r["agent_kernel_cpu"] / max(r["agent_cpu"], 1e-9) * 100
                print(f"{per_s:>10,.0f} {r['kernel']:>8,.0f} {r['judged']:>8,.0f} {drops:>24} "
                      f"{r['unaccounted']:>6,.0f} {a_util:>7.1f}% {a_util / (per_s / 1000):>6.1f}% "
                      f"{k_share:>7.0f}% {cap:>11,.0f} {p_util:>7.1f}% {p_util / (per_s / 1000):>6.1f}% "
                      f"{r['agent_cpu'] / max(r['peer_cpu'], 1e-9):>5.1f}x", flush=True)
                busy = sorted(((v, k) for k, v in r["threads"].items() if v > 0), reverse=True)
                print("           agent CPU by thread: " + ", ".join(
                    f"{k} {v / max(r['agent_cpu'], 1e-9) * 100:.0f}% ({v / max(r['judged'], 1) * 1e6:.0f} us/flow)"
                    for v, k in busy), flush=True)
    print(f"\nwork files (agent log, evidence) in {work}")


if __name__ == "__main__":
    random.seed(0)
    main()
