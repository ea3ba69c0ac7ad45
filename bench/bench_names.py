"""Name extraction against tshark, measured in the same run, on a flow-heavy capture.

Builds a capture of --flows flows (default 20,000) as a client population makes them: each flow is a
DNS answer (A record, sometimes via a CNAME), then either a TCP connection (SYN, a ClientHello with
SNI, data both ways) or, one flow in four, QUIC (a client Initial sealed with the real key schedule,
then short-header data). Then prints, from one run:

  * names pass (`agent.sources.capfile.names.scan`, what `audit` runs): packets/s over the file,
    packets that reached Python, and names extracted per second (SNI + QUIC SNI + DNS answers);
  * tshark doing the same extraction on the same file
    (`-Y "tls.handshake.type==1 or dns.flags.response==1" -e tls.handshake.extensions_server_name
    -e dns.qry.name`): packets/s and names/s, and the ratio ours / tshark;
  * that both found the same SNI names;
  * as root, the live capture source: frames of the capture blasted over a veth pair in a private
    network namespace (documentation addresses only, nothing leaves it) for --seconds, and the
    packets/s reaching Python through the kernel BPF filter, with the kernel's drop count.

With `--captures DIR`, also compares, capture by capture, the SNI each flow gets from `audit` with
what `tshark -Y tls.handshake.type==1 -e tls.handshake.extensions_server_name` prints (TLS and QUIC),
keyed by 5-tuple (e.g. the nDPI captures in ../shared/data/captures).

    python bench/bench_names.py [--flows N] [--seconds S] [--workdir DIR] [--captures DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
RESOLVER = bytes([192, 0, 2, 53])


def _ip(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    return ETH + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst) + l4


def _tcp(sport, dport, seq, flags, payload=b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 0x50, flags, 65535, 0, 0) + payload


def _udp(sport, dport, payload) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _name(n: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"


def _dns(qname: str, addr: bytes, cname: str | None) -> bytes:
    msg = struct.pack("!HHHHHH", 1, 0x8180, 1, 2 if cname else 1, 0, 0) + _name(qname) + struct.pack("!HH", 1, 1)
    if cname:
        msg += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(_name(cname))) + _name(cname)
        msg += _name(cname) + struct.pack("!HHIH", 1, 1, 60, 4) + addr
    else:
        msg += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + addr
    return msg


def build_capture(path: Path, flows: int, seed: int = 11) -> tuple[int, set]:
    from tests.names import build

    rnd = random.Random(seed)
    hello_tpl = build.records(build.client_hello("h0000000.example00.com"))
    pos = hello_tpl.index(b"h0000000.example00.com")
    frames, t, snis = [], 1750000000.0, set()
    for i in range(flows):
        client = bytes([10, 0, i // 250 % 250, 1 + i % 250])
        dst = bytes([rnd.randint(11, 222), rnd.randint(0, 255), rnd.randint(0, 255), rnd.randint(1, 254)])
        name = f"h{i:07d}.example{i % 100:02d}.com"
        sport = 1024 + i % 60000
        frames.append((t, _ip(RESOLVER, client, 17, _udp(53, 40000 + i % 20000, _dns(name, dst, (
            f"edge{i % 997}.cdn.example" if i % 3 == 0 else None))))))
        t += 0.0005
        if i % 4 == 3:
            hello = build.client_hello(name)
            initial = build.seal_initial(i.to_bytes(8, "big"), build.crypto_frame(0, hello))
            frames.append((t, _ip(client, dst, 17, _udp(sport, 443, initial))))
            for k in range(4):
                frames.append((t + 0.01 * k, _ip(dst if k % 2 else client, client if k % 2 else dst, 17,
                                                 _udp(443 if k % 2 else sport, sport if k % 2 else 443,
                                                      b"\x40" + bytes(1199)))))
        else:
            hello = hello_tpl[:pos] + name.encode() + hello_tpl[pos + len(name):]
            frames.append((t, _ip(client, dst, 6, _tcp(sport, 443, 1000, 0x02))))
            frames.append((t + 0.001, _ip(dst, client, 6, _tcp(443, sport, 5000, 0x12))))
            frames.append((t + 0.002, _ip(client, dst, 6, _tcp(sport, 443, 1001, 0x18, hello))))
            for k in range(4):
                frames.append((t + 0.01 * (k + 1), _ip(dst if k % 2 else client, client if k % 2 else dst, 6,
                                                       _tcp(443 if k % 2 else sport, sport if k % 2 else 443,
                                                            2000 + 1400 * k, 0x18, bytes(1400)))))
        snis.add(name)
        t += 0.001
    frames.sort(key=lambda f: f[0])
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for ts, data in frames:
            sec = int(ts)
            f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(data), len(data)) + data)
    return len(frames), snis


def ours(path: Path):
    from agent.names.extract import NameExtractor
    from agent.sources.capfile.names import scan

    ex = NameExtractor(dns_size=1 << 22)
    fed = [0]
    real = ex.feed

    def feed(seg, at):
        fed[0] += 1
        return real(seg, at)

    ex.feed = feed
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    scan(fd, "pcap", str(path), ex)
    dt = time.perf_counter() - t0
    os.close(fd)
    c = ex.stats()
    names = c.get("names_sni", 0) + c.get("names_quic-sni", 0) + c.get("dns_responses", 0)
    snis = {v[0] for v in ex._named.values()}
    return dt, fed[0], names, snis, c


def tshark(path: Path):
    t0 = time.perf_counter()
    r = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", "tls.handshake.type==1 or dns.flags.response==1",
                        "-T", "fields", "-e", "tls.handshake.extensions_server_name", "-e", "dns.qry.name"],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    snis = {a for a, _b in rows if a}
    return dt, sum(1 for a, b in rows if a or b), snis


def live(path: Path, seconds: float):
    """Blast the capture's frames over a veth pair in a private namespace; CaptureNames reads one end."""
    from agent.names.extract import NameExtractor
    from agent.sources.capture.source import CaptureNames
    from agent.wire.netlink import in_netns

    ns = f"eabench{os.getpid()}"
    sh = lambda *c: subprocess.run(c, check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "ea-b0", "type", "veth", "peer", "name", "ea-b1")
        for dev in ("ea-b0", "ea-b1", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        frames = []
        data = path.read_bytes()
        off = 24
        while off + 16 <= len(data):
            n = struct.unpack_from("<I", data, off + 8)[0]
            frames.append(data[off + 16:off + 16 + n])
            off += 16 + n
        ex = NameExtractor()
        cap = CaptureNames(ex, interfaces=("ea-b1",), netns=ns).open()
        stop = threading.Event()
        reader = threading.Thread(target=cap.run, args=(stop,), daemon=True)
        reader.start()
        with in_netns(ns):
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            tx.bind(("ea-b0", 0))
        sent, end = 0, time.monotonic() + seconds
        t0 = time.monotonic()
        while time.monotonic() < end:
            for f in frames[:5000]:
                tx.send(f)
            sent += 5000
        dt = time.monotonic() - t0
        time.sleep(0.5)
        stop.set()
        reader.join(5)
        tx.close()
        return sent / dt, cap.packets / dt, cap.kernel_drops, ex.stats()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def compare_real(folder: Path):
    import ipaddress

    from agent.sources.capfile.reader import read_capture

    for p in sorted(folder.glob("*.pcap*")):
        ours = {(f.src, f.sport, f.dst, f.dport): f.hostname for f in read_capture(str(p)).flows
                if f.hostname_source in ("sni", "quic-sni")}
        r = subprocess.run(["tshark", "-n", "-r", str(p), "-Y", "tls.handshake.type==1", "-T", "fields",
                            "-e", "ip.src", "-e", "ipv6.src", "-e", "tcp.srcport", "-e", "udp.srcport", "-e", "ip.dst",
                            "-e", "ipv6.dst", "-e", "tcp.dstport", "-e", "udp.dstport",
                            "-e", "tls.handshake.extensions_server_name"], capture_output=True, text=True)
        theirs = {}
        for line in r.stdout.splitlines():
            a = line.split("\t")
            if len(a) == 9 and a[8]:
                key = (str(ipaddress.ip_address(a[0] or a[1])), int(a[2] or a[3]),
                       str(ipaddress.ip_address(a[4] or a[5])), int(a[6] or a[7]))
                theirs[key] = a[8].split(",")[0].lower()
        print(f"  {p.name}: {len(ours)} named flows, tshark {len(theirs)}, equal: {ours == theirs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workdir")
    ap.add_argument("--captures", type=Path, help="compare SNI with tshark on every capture in this folder")
    a = ap.parse_args()
    if a.captures:
        print(f"real captures in {a.captures}: SNI per flow, ours against tshark")
        compare_real(a.captures)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-names-"))
    path = work / "names.pcap"
    packets, want = build_capture(path, a.flows)
    print(f"capture: {packets:,} packets, {a.flows:,} flows (DNS answer each; TLS 3 in 4, QUIC 1 in 4)")
    dt, fed, names, snis, counts = ours(path)
    print(f"ours    names pass: {dt:6.2f} s  {packets / dt:10,.0f} packets/s  {fed:,} reached Python  "
          f"{names / dt:9,.0f} names/s  ({counts.get('names_sni', 0):,} SNI, {counts.get('names_quic-sni', 0):,} "
          f"QUIC SNI, {counts.get('dns_responses', 0):,} DNS)")
    if shutil.which("tshark"):
        tdt, tnames, tsnis = tshark(path)
        print(f"tshark  same fields: {tdt:6.2f} s  {packets / tdt:10,.0f} packets/s  {tnames / tdt:9,.0f} names/s")
        print(f"ratio ours/tshark: {(names / dt) / (tnames / tdt):.2f}x names/s; SNI names found of "
              f"{len(want):,} sent: ours {len(snis & want):,}, tshark {len(tsnis & want):,}")
    else:
        print("tshark not installed: no peer measured")
    if os.geteuid() == 0:
        tx, rx, drops, c = live(path, a.seconds)
        print(f"live capture source: sent {tx:,.0f} frames/s over veth, {rx:,.0f} packets/s reached Python "
              f"through the BPF filter, kernel drops {drops:,} (names: {c.get('names_sni', 0):,} SNI, "
              f"{c.get('dns_responses', 0):,} DNS answers)")
    else:
        print("live capture source: needs root (network namespace), skipped")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
