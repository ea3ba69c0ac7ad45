"""Enforcement: building the refuse sets for a whole-world database, and what a new connection
costs with them in the kernel, against the same connection without them (measured in one run).

1. Builds a country MMDB from the registries' per-country blocks (../shared/data/country-ip-blocks,
   ~170,000 IPv4 and ~74,000 IPv6 blocks; 198.51.100.0/24 is added as DE for step 3) and compiles
   the refuse sets of a GDPR-style policy (allow EEA and adequate countries, `enforce: refuse`):
   seconds, pieces of address space judged, set elements. Then the same on the embedded registration
   data (IPv4 probed). Then loads the table in a namespace (`nft` transaction through libnftables) and
   prints its time beside `nft -f` of the same text (the peer: the kernel's own load path).
2. Per new connection: a load generator in a client namespace opens and closes N TCP connections to
   a server in a peer namespace (over a veth pair, documentation addresses only, allowed by the
   policy, so every SYN walks the whole refuse chain), with the whole-world table loaded and without
   it (connection tracking on in both), in alternating rounds; prints connections/s, system CPU
   per connection, and the ratio.

    sudo python bench/bench_enforce.py [--blocks DIR] [--connections N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POLICY = """\
version: 1
name: gdpr
home: [EU]
enforce: refuse
registration_as_location: true  # as the shipped policies: the embedded data's country counts
allow: {jurisdictions: [EEA, EU-ADEQUATE]}
"""

LOADGEN = """
import resource, socket, sys, time
n, dst = int(sys.argv[1]), sys.argv[2]
t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\0\\0\\0\\0\\0\\0\\0")  # RST on close: no TIME_WAIT
    s.connect((dst, 443)); s.close()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t, r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime)
"""

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 443)); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"""


def build_world(blocks: Path, path: Path) -> int:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country", languages=["en"],
                   description="bench: registries' blocks")
    n = 0
    for fam in ("ipv4", "ipv6"):
        for f in sorted((blocks / fam).glob("*.cidr")):
            cc = f.stem.upper()
            if cc in ("EU", "AP"):
                continue  # pseudo-codes: no country
            cidrs = [c.strip() for c in f.read_text().split() if c.strip()]
            n += len(cidrs)
            w.insert_network(IPSet(cidrs), {"country": {"iso_code": cc, "names": {"en": cc}}})
    w.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "DE", "names": {"en": "DE"}}})
    w.to_db_file(str(path))
    return n


def compile_world(policies: Path, dbs: tuple[str, ...]):
    from agent.config import Config
    from agent.enforce.compile import compile_plan
    from agent.enforce.cuts import location_cuts
    from agent.enforce.never import never_refuse
    from agent.judge.build import build_pipeline

    cfg = Config(policies=str(policies), geoip_databases=dbs, local_nets=("192.0.2.0/24", "2001:db8:1::/64"),
                 public_nets=("198.51.100.0/24",))
    t = time.perf_counter()
    pipe = build_pipeline(cfg)
    keep, _ = never_refuse(cfg, cfg.local_nets, resolv_conf="/nonexistent", ntp_files=())
    cuts = location_cuts(pipe.locator)
    t_cuts = time.perf_counter() - t
    plan = compile_plan(pipe, pipe.policies, keep, cuts)
    return plan, t_cuts, time.perf_counter() - t


def sh(*cmd, check=True, input=None):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, input=input)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default=str(REPO.parent / "shared" / "data" / "country-ip-blocks"))
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, nftables)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-enforce-"))
    (work / "policies").mkdir(exist_ok=True)
    (work / "policies" / "gdpr.yaml").write_text(POLICY)
    world = work / "world.mmdb"
    t = time.perf_counter()
    blocks = build_world(Path(args.blocks), world)
    print(f"whole-world MMDB from {blocks:,} registry blocks built in {time.perf_counter() - t:.1f} s")

    from agent.enforce.nft import render

    plan, t_cuts, t_all = compile_world(work / "policies", (str(world),))
    e = plan.policies[0].elements()
    print(f"compile (MMDB):     {t_all:6.2f} s  (reading the database's networks {t_cuts:.2f} s); "
          f"{plan.pieces:,} pieces judged; refuse set {e[4]:,} IPv4 + {e[6]:,} IPv6 intervals")
    eplan, e_cuts, e_all = compile_world(work / "policies", ())
    ee = eplan.policies[0].elements()
    print(f"compile (embedded): {e_all:6.2f} s  (probing the registration data {e_cuts:.2f} s); "
          f"{eplan.pieces:,} pieces judged; refuse set {ee[4]:,} IPv4 intervals (IPv6: not listable)")

    text = render(plan)
    (work / "table.nft").write_text(text.replace("  flags owner\n", ""))
    tag = uuid.uuid4().hex[:6]
    c, p, v0, v1 = f"bee-c-{tag}", f"bee-p-{tag}", f"be0{tag}", f"be1{tag}"
    try:
        sh("ip", "netns", "add", c)
        sh("ip", "netns", "add", p)
        sh("ip", "link", "add", v0, "netns", c, "type", "veth", "peer", "name", v1, "netns", p)
        for ns, dev, a in ((c, v0, "192.0.2.1/24"), (p, v1, "192.0.2.2/24")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", a, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", c, "route", "add", "198.51.100.0/24", "via", "192.0.2.2")
        sh("ip", "-n", p, "addr", "add", "198.51.100.7/32", "dev", "lo")
        # load time: the agent's way (libnftables in-process, owner table) against `nft -f`
        t = time.perf_counter()
        sh("ip", "netns", "exec", c, "nft", "-f", str(work / "table.nft"))
        t_nft = time.perf_counter() - t
        sh("ip", "netns", "exec", c, "nft", "delete", "table", "inet", "egress_agent_enforce")
        code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\nfrom agent.enforce.nft import Nft\n"
                f"n = Nft(); t = time.perf_counter(); n.run(open({str(work / 'table.nft')!r}).read())\n"
                "print(time.perf_counter() - t)\n")
        t_lib = float(sh("ip", "netns", "exec", c, sys.executable, "-c", code).stdout)
        print(f"load the table:     {t_lib:6.2f} s through libnftables, {t_nft:.2f} s with nft -f "
              f"(ratio {t_lib / t_nft:.2f})")
        # both runs track connections (the agent's conntrack source turns tracking on anyway): the
        # difference is the refuse table alone
        sh("ip", "netns", "exec", c, "nft", "-f", "-", input="table inet bench_ct {\n chain o {\n"
           "  type filter hook output priority 10; policy accept;\n  ct state established accept\n }\n}\n")
        server = subprocess.Popen(["ip", "netns", "exec", p, sys.executable, "-c", SERVER])
        time.sleep(0.5)
        results = {"off": [], "on": []}
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                if mode == "on":
                    sh("ip", "netns", "exec", c, "nft", "-f", str(work / "table.nft"))
                out = sh("ip", "netns", "exec", c, sys.executable, "-c", LOADGEN, str(args.connections),
                         "198.51.100.7").stdout.split()
                if mode == "on":
                    sh("ip", "netns", "exec", c, "nft", "delete", "table", "inet", "egress_agent_enforce")
                results[mode].append(tuple(map(float, out)))
        server.kill()
        best = {m: min(v, key=lambda x: x[0]) for m, v in results.items()}
        n = args.connections
        for m in ("off", "on"):
            wall, sys_s, _usr = best[m]
            print(f"new connections, enforcement {m:3}: {n / wall:9,.0f}/s, {sys_s / n * 1e6:6.1f} us system CPU "
                  f"per connection (best of {args.rounds})")
        print(f"ratio on/off: {best['off'][0] and best['on'][0] / best['off'][0]:.3f} wall time, "
              f"{best['on'][1] / max(best['off'][1], 1e-9):.3f} system CPU per connection")
    finally:
        sh("ip", "netns", "del", c, check=False)
        sh("ip", "netns", "del", p, check=False)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
