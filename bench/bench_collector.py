"""The flow collector's speed against nfacctd (pmacct), on the same IPFIX export stream.

Builds an IPFIX stream as a router exports it (a template, then data sets of 30 records per
datagram: each connection a local host opens to a distinct public address is two records, the
request and the reply, as one-way exporters send them; sequence numbers as RFC 7011 counts them),
then for each rate in --rates sends it over loopback for --seconds to two collectors in turn:

  * egress-agent run --source netflow   (shipped policies, a GeoIP country MMDB, evidence on)
  * nfacctd                             (the peer: pmacct's collector in C, aggregating by
                                         destination country with the same MMDB, print plugin)

and prints, per rate and collector: records sent, the CPU seconds the collector's processes used
(utime + stime from /proc, children included), records per CPU-second, for the agent the CPU of
each of its threads (decoding and pairing in ea-source-netflow, judging in ea-worker), and the
books: records decoded by outcome + records lost (sequence gaps, i.e. kernel socket drops) =
records sent, with what is left unaccounted (should be 0). Then the CPU ratio agent / nfacctd.

    python bench/bench_collector.py [--rates 5000,20000,50000] [--seconds 5] [--workers N]

With --workers N the agent runs N SO_REUSEPORT worker processes; their CPU counts (the process
group's), and the stream comes from one exporter port, so one worker decodes it all (as one
router's stream would): the bench shows the per-worker rate, and what the judging thread costs.

Targets (issue 22): >= 50,000 records per CPU-second per worker, CPU <= 2x nfacctd's, zero
unaccounted records at the rates reached. Loopback only; documentation and private addresses in
the records (nothing is sent to them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_audit import build_mmdb  # noqa: E402

RECORDS_PER_DATAGRAM = 30
# IPFIX template 256: src4, dst4, sport, dport, proto, tcpControlBits, packets, octets, start/end ms
FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 2), (2, 8), (1, 8), (152, 8), (153, 8)]
REC = struct.Struct("!4s4sHHBHQQQQ")


def _set(sid: int, payload: bytes) -> bytes:
    return struct.pack("!HH", sid, 4 + len(payload)) + payload


TEMPLATE = _set(2, struct.pack("!HH", 256, len(FIELDS)) + b"".join(struct.pack("!HH", *f) for f in FIELDS))


def stream(n_records: int, seed: int = 7) -> list[bytes]:
    """IPFIX datagrams holding n_records records (request and reply of n_records / 2 connections)."""
    rnd = random.Random(seed)
    now_ms = int(time.time() * 1000)
    out, seq, recs = [], 0, []
    for i in range(n_records // 2):
        local = socket.inet_aton(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
        peer = socket.inet_aton(f"{rnd.randint(11, 222)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}."
                                f"{rnd.randint(1, 254)}")
        sport = 32768 + i % 28000
        t = now_ms - 5000 + i % 1000
        recs.append(REC.pack(local, peer, sport, 443, 6, 0x1B, 12, 1500, t, t + 900))
        recs.append(REC.pack(peer, local, 443, sport, 6, 0x1B, 20, 24000, t + 20, t + 880))
    for k in range(0, len(recs), RECORDS_PER_DATAGRAM):
        body = recs[k:k + RECORDS_PER_DATAGRAM]
        sets = (TEMPLATE if k % (RECORDS_PER_DATAGRAM * 100) == 0 else b"") + _set(256, b"".join(body))
        out.append(struct.pack("!HHIII", 10, 16 + len(sets), now_ms // 1000, seq, 1) + sets)
        seq += len(body)
    return out


def send(port: int, datagrams: list[bytes], rate: float) -> float:
    """Send at `rate` records per second; returns the seconds it took."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    per = RECORDS_PER_DATAGRAM / rate
    start = time.monotonic()
    for i, d in enumerate(datagrams):
        due = start + i * per
        delay = due - time.monotonic()
        if delay > 0.0005:
            time.sleep(delay)
        s.sendto(d, ("127.0.0.1", port))
    s.close()
    return time.monotonic() - start


def cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in the group (a collector and its plugins)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def thread_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each thread of one process, by thread name (the agent names its threads:
    ea-source-netflow decodes and pairs, ea-worker judges and writes evidence)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name, fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)
        except OSError:
            continue
        comm = name.split("(", 1)[1]
        f = fields.split()
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


def settle(pgid: int, quiet: float = 1.5, limit: float = 120.0) -> float:
    """Wait until the group's CPU time stops growing for `quiet` seconds; its CPU seconds then."""
    end = time.monotonic() + limit
    last, since = cpu_seconds(pgid), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.25)
        now = cpu_seconds(pgid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = s.value
    return out


def total(m: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def run_agent(work: Path, mmdb: Path, datagrams: list[bytes], rate: float, n: int, workers: int = 1) -> dict:
    port, mport = free_port(socket.SOCK_DGRAM), free_port()
    log = open(work / "agent.log", "ab")
    cfg = work / "agent.yaml"
    cfg.write_text(json.dumps({"sources": ["netflow"], "netflow": {"listen": [f"127.0.0.1:{port}"],
                                                                   "workers": workers}}))
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg), "--geoip-db", str(mmdb),
                          "--listen", f"127.0.0.1:{mport}", "--evidence", str(work / "evidence.jsonl"),
                          "--no-attribution", "--no-host-addresses", "--queue-size", "1000000"],
                         cwd=REPO, stdout=log, stderr=log, start_new_session=True)
    try:
        for _ in range(200):
            try:
                if total(metrics(mport), "egress_agent_source_up", source="netflow") == 1:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        before = cpu_seconds(p.pid)
        threads_before = thread_seconds(p.pid)
        took = send(port, datagrams, rate)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until every record is decoded or known lost
            m = metrics(mport)
            seen = (total(m, "egress_agent_exporter_records_total")
                    + total(m, "egress_agent_exporter_lost_records_total"))
            if seen >= n and total(m, "egress_agent_flows_queued") == 0:
                break
            time.sleep(0.25)
        cpu = settle(p.pid) - before
        after = thread_seconds(p.pid)
        threads = {k: v - threads_before.get(k, 0.0) for k, v in after.items()}
        m = metrics(mport)
        out = {o: total(m, "egress_agent_exporter_records_total", outcome=o)
               for o in ("connection", "merged", "not_egress", "refused", "error")}
        out["lost"] = total(m, "egress_agent_exporter_lost_records_total")
        out["judged"] = total(m, "egress_agent_flows_judged_total", source="netflow")
        out["dropped"] = total(m, "egress_agent_source_drops_total", source="netflow") - out["lost"]
        out["unaccounted"] = n - sum(out[k] for k in ("connection", "merged", "not_egress", "refused", "error", "lost"))
        out.update(cpu=cpu, took=took, threads=threads)
        return out
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
        log.close()


def run_nfacctd(work: Path, mmdb: Path, datagrams: list[bytes], rate: float) -> dict:
    port = free_port(socket.SOCK_DGRAM)
    conf = work / "nfacctd.conf"
    conf.write_text(f"daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\nplugins: print\n"
                    f"aggregate: dst_host_country\ngeoipv2_file: {mmdb}\nprint_output: csv\n"
                    f"print_output_file: {work / 'nfacctd.csv'}\nprint_refresh_time: 3600\n"
                    "nfacctd_pipe_size: 67108864\n")
    log = open(work / "nfacctd.log", "ab")
    p = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=log, stderr=log, start_new_session=True)
    try:
        time.sleep(1.5)
        if p.poll() is not None:
            raise SystemExit(f"nfacctd did not start: {(work / 'nfacctd.log').read_text()[-800:]}")
        before = cpu_seconds(p.pid)
        took = send(port, datagrams, rate)
        cpu = settle(p.pid) - before
        return {"cpu": cpu, "took": took}
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # its output is not needed, and it purges slowly on TERM
        p.wait(timeout=30)
        log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="5000,20000,50000", help="records per second sent")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workdir")
    ap.add_argument("--workers", type=int, default=1, help="the agent's netflow.workers (SO_REUSEPORT processes)")
    a = ap.parse_args()
    if not shutil.which("nfacctd"):
        raise SystemExit("bench needs nfacctd (apt-get install pmacct)")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="egress-collector-"))
    work.mkdir(parents=True, exist_ok=True)
    mmdb = work / "bench.mmdb"
    if not mmdb.exists():
        build_mmdb(mmdb)
    print(f"{'rate rec/s':>10} {'collector':10} {'records':>9} {'CPU s':>7} {'rec/CPU-s':>10}  books", flush=True)
    results = []
    for rate in (float(r) for r in a.rates.split(",")):
        n = int(rate * a.seconds) // RECORDS_PER_DATAGRAM * RECORDS_PER_DATAGRAM
        datagrams = stream(n)
        ag = run_agent(work, mmdb, datagrams, rate, n, a.workers)
        nf = run_nfacctd(work, mmdb, datagrams, rate)
        books = (f"judged {ag['judged']:,.0f}, merged {ag['merged']:,.0f}, not_egress {ag['not_egress']:,.0f}, "
                 f"error {ag['error']:,.0f}, lost {ag['lost']:,.0f}, dropped {ag['dropped']:,.0f}, "
                 f"unaccounted {ag['unaccounted']:,.0f}")
        print(f"{rate:>10,.0f} {'agent':10} {n:>9,} {ag['cpu']:>7.2f} {n / max(ag['cpu'], 1e-9):>10,.0f}  {books}")
        busy = sorted(((v, k) for k, v in ag["threads"].items() if v >= 0.01), reverse=True)
        print(f"{'':>10} agent threads: " + ", ".join(f"{k} {v:.2f} s" for v, k in busy))
        print(f"{rate:>10,.0f} {'nfacctd':10} {n:>9,} {nf['cpu']:>7.2f} {n / max(nf['cpu'], 1e-9):>10,.0f}")
        print(f"{'':>10} CPU ratio agent / nfacctd: {ag['cpu'] / max(nf['cpu'], 1e-9):.1f}x", flush=True)
        results.append({"rate": rate, "records": n, "agent": ag, "nfacctd": nf})
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
