"""The capture reader, proven equal to scapy's dissection on every link type we support."""

import random
import struct
from collections import defaultdict

import pytest
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    Ether,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    fragment,
    raw,
    rdpcap,
)
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Loopback

from agent.errors import UserError
from agent.sources.capfile import walk as pcap_mod
from agent.sources.capfile.reader import read_capture
from agent.wire import decode as dec
from tests.helpers import write_pcap, write_pcapng

SRC4, DST4 = "192.0.2.10", "203.0.113.9"
SRC6, DST6 = "2001:db8::10", "2001:db8:5::9"


@pytest.fixture(autouse=True, params=["c", "python"])
def reader_path(request, monkeypatch):
    """Every test runs on the C accelerator and on the pure Python + numpy path."""
    if request.param == "c" and pcap_mod._c_walk is None:
        pytest.skip("C accelerator not built (no compiler at install time)")
    monkeypatch.setitem(pcap_mod.WALK, "c", request.param == "c")
    return request.param


def ETH(**kw):
    """Ethernet with explicit addresses: scapy would otherwise ARP for the destination MAC."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


def ip_packets(seed=1, n=200):
    """A mix of IPv4/IPv6, TCP/UDP/ICMP, fragments and IPv6 extension headers."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = rnd.choice(["tcp4", "udp4", "icmp4", "tcp6", "udp6", "hbh6", "rt6", "frag6", "frag4"])
        sport, dport = rnd.randint(1024, 65535), rnd.choice([53, 443, 8443])
        pay = Raw(bytes(rnd.randint(0, 300)))
        dst4 = f"203.0.113.{rnd.randint(1, 3)}"
        dst6 = f"2001:db8:5::{rnd.randint(1, 3)}"
        if kind == "tcp4":
            p = IP(src=SRC4, dst=dst4) / TCP(sport=sport, dport=dport) / pay
        elif kind == "udp4":
            p = IP(src=SRC4, dst=dst4) / UDP(sport=sport, dport=dport) / pay
        elif kind == "icmp4":
            p = IP(src=SRC4, dst=dst4) / ICMP() / pay
        elif kind == "tcp6":
            p = IPv6(src=SRC6, dst=dst6) / TCP(sport=sport, dport=dport) / pay
        elif kind == "udp6":
            p = IPv6(src=SRC6, dst=dst6) / UDP(sport=sport, dport=dport) / pay
        elif kind == "hbh6":
            p = IPv6(src=SRC6, dst=dst6) / IPv6ExtHdrHopByHop() / UDP(sport=sport, dport=dport) / pay
        elif kind == "rt6":
            p = IPv6(src=SRC6, dst=dst6) / IPv6ExtHdrRouting(addresses=[]) / TCP(sport=sport, dport=dport) / pay
        elif kind == "frag6":
            frag = IPv6ExtHdrFragment(offset=rnd.choice([0, 10]), m=1)
            p = IPv6(src=SRC6, dst=dst6) / frag / UDP(sport=sport, dport=dport) / pay
        else:
            big = IP(src=SRC4, dst=dst4, id=i) / UDP(sport=sport, dport=dport) / Raw(bytes(1200))
            out.extend(fragment(big, fragsize=400))
            continue
        out.append(p)
    return out


def scapy_flows(pkts):
    """Reference: aggregate with scapy's own field parsing of the outermost IP header.

    `pkts` is a capture path (scapy's rdpcap dissects it) or packets, which are re-dissected from
    their bytes so that every length field is the one on the wire.
    """
    if isinstance(pkts, str):
        pkts = rdpcap(pkts)
    else:
        pkts = [(IP if p.version == 4 else IPv6)(raw(p)) for p in pkts]
    flows = defaultdict(lambda: [0, 0])
    for p in pkts:
        ip = p[IP] if IP in p else p[IPv6] if IPv6 in p else None
        if ip is None:
            continue
        if isinstance(ip, IP):
            proto, iplen = ip.proto, ip.len
            first = ip.frag == 0
        else:
            proto, iplen = ip.nh, 40 + ip.plen
            first = not (IPv6ExtHdrFragment in p and p[IPv6ExtHdrFragment].offset != 0)
            layer = ip.payload
            while layer.__class__.__name__.startswith("IPv6ExtHdr"):
                proto = layer.nh
                layer = layer.payload
        sport = dport = 0
        if proto in (6, 17) and first:
            l4 = p[TCP] if proto == 6 else p[UDP]
            sport, dport = l4.sport, l4.dport
        key = (proto, ip.src, sport, ip.dst, dport)
        flows[key][0] += 1
        flows[key][1] += iplen
    return dict(flows)


def ours(path):
    """Packets and bytes per one-way 5-tuple (summed over its connections, should it idle out)."""
    cap = read_capture(str(path))
    out: dict = {}
    for f in cap.flows:
        row = out.setdefault((f.proto, f.src, f.sport, f.dst, f.dport), [0, 0])
        row[0] += f.packets
        row[1] += f.bytes
    return out, cap.stats


def frames_for(link, pkts):
    """Wrap IP packets in each link type's header (built by scapy where scapy has the layer)."""
    out = []
    for p in pkts:
        v6 = IPv6 in p and IP not in p
        if link == "ethernet":
            f = ETH() / p
        elif link == "vlan":
            f = ETH() / Dot1Q(vlan=10) / p
        elif link == "qinq":
            f = ETH(type=0x88A8) / Dot1Q(vlan=100, type=0x8100) / Dot1Q(vlan=10) / p
        elif link == "vlan3":  # three tags: the scalar path
            f = ETH() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / p
        elif link == "sll":
            f = CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, proto=0x86DD if v6 else 0x0800) / p
        elif link == "sll2":
            f = CookedLinuxV2(proto=0x86DD if v6 else 0x0800, ifindex=2, pkttype=4, lladdrlen=6) / p
        elif link == "null":
            f = Loopback(type=24 if v6 else 2) / p
        elif link == "loop":
            out.append(struct.pack(">I", 24 if v6 else 2) + raw(p))
            continue
        else:
            f = p
        out.append(raw(f))
    return out


LINKS = {"ethernet": 1, "vlan": 1, "qinq": 1, "vlan3": 1, "sll": 113, "sll2": 276, "raw": 101,
         "null": 0, "loop": 108}


@pytest.mark.parametrize("link", sorted(LINKS))
def test_link_types_match_scapy(tmp_path, link):
    pkts = ip_packets(seed=len(link))
    frames = frames_for(link, pkts)
    path = write_pcap(tmp_path / f"{link}.pcap", [(1700000000 + i * 0.001, fr) for i, fr in enumerate(frames)],
                      linktype=LINKS[link])
    got, stats = ours(path)
    if link not in ("loop", "null"):  # scapy lacks DLT 108 and BSD AF_INET6=24 bindings; packets still match
        assert got == scapy_flows(path)
    assert got == scapy_flows(pkts)
    assert stats.malformed == 0 and stats.non_ip == 0 and stats.packets == len(frames)


@pytest.mark.parametrize("lt", [228, 229])
def test_ipv4_and_ipv6_only_link_types(tmp_path, lt):
    pkts = [p for p in ip_packets(seed=7) if (IP in p) == (lt == 228)]
    path = write_pcap(tmp_path / "x.pcap", [(1.0, raw(p)) for p in pkts], linktype=lt)
    got, _ = ours(path)
    assert got == scapy_flows(pkts)


def test_vectorised_path_equals_scalar_decoder(tmp_path):
    """Every packet decoded alone by the reference decoder gives the same flows as the fast path."""
    pkts = ip_packets(seed=99, n=400)
    frames = frames_for("ethernet", pkts) + frames_for("vlan", pkts[:50])
    frames.append(raw(ETH(type=0x0806) / Raw(bytes(28))))  # ARP: not IP
    path = write_pcap(tmp_path / "mix.pcap", [(5.0, f) for f in frames])
    got, stats = ours(path)
    ref = defaultdict(lambda: [0, 0])
    for f in frames:
        d = dec.decode(1, f)
        if isinstance(d, dec.Decoded):
            import ipaddress
            def name(b, v4=d.version == 4):
                return str(ipaddress.IPv4Address(b[12:]) if v4 else ipaddress.IPv6Address(b))
            k = (d.proto, name(d.src), d.sport, name(d.dst), d.dport)
            ref[k][0] += 1
            ref[k][1] += d.iplen
    assert got == dict(ref)
    assert stats.non_ip == 1


def test_timestamps_and_first_last_seen(tmp_path):
    p = raw(ETH() / IP(src=SRC4, dst=DST4) / TCP(sport=1000, dport=443))
    path = write_pcap(tmp_path / "ns.pcap", [(1700000000.123456789, p), (1700000005.5, p)], nano=True)
    (flow,) = read_capture(path).flows
    assert flow.first_seen == pytest.approx(1700000000.123456789, abs=1e-6)
    assert flow.last_seen == pytest.approx(1700000005.5)
    assert flow.packets == 2 and flow.bytes == 80


def test_big_endian_pcap(tmp_path):
    pkts = ip_packets(seed=3, n=50)
    path = write_pcap(tmp_path / "be.pcap", [(1.5, f) for f in frames_for("ethernet", pkts)], endian=">")
    got, stats = ours(path)
    assert got == scapy_flows(pkts) and stats.format == "pcap"


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_many_interfaces_and_link_types(tmp_path, endian):
    pkts = ip_packets(seed=11, n=120)
    ifaces = [(1, None), (113, 9), (101, 6), (276, None)]
    names = ["ethernet", "sll", "raw", "sll2"]
    packets = []
    for i, p in enumerate(pkts):
        k = i % 4
        packets.append((k, 1700000000 + i, frames_for(names[k], [p])[0]))
    path = write_pcapng(tmp_path / "multi.pcapng", ifaces, packets, endian=endian, sections=2)
    got, stats = ours(path)
    assert got == scapy_flows(pkts)
    assert stats.format == "pcapng"
    assert stats.to_json()["link_types"] == ["ethernet", "linux-sll", "linux-sll2", "raw"]
    cap = read_capture(path)
    assert min(f.first_seen for f in cap.flows) == pytest.approx(1700000000, abs=1e-3)


def test_truncated_capture_keeps_whole_records(tmp_path):
    pkts = ip_packets(seed=5, n=30)
    frames = frames_for("ethernet", pkts)
    path = write_pcap(tmp_path / "full.pcap", [(1.0, f) for f in frames])
    data = open(path, "rb").read()
    cut = len(data) - len(frames[-1]) // 2
    open(tmp_path / "cut.pcap", "wb").write(data[:cut])
    got, stats = ours(tmp_path / "cut.pcap")
    assert stats.truncated and stats.truncated_offset == len(data) - len(frames[-1]) - 16
    assert got == scapy_flows(pkts[:-1])
    assert "truncated at byte offset" in stats.warnings[0] and "cut.pcap" in stats.warnings[0]


def test_truncated_pcapng(tmp_path):
    pkts = ip_packets(seed=6, n=10)
    path = write_pcapng(tmp_path / "a.pcapng", [(1, None)], [(0, 1.0, f) for f in frames_for("ethernet", pkts)])
    data = open(path, "rb").read()
    open(tmp_path / "b.pcapng", "wb").write(data[:-10])
    got, stats = ours(tmp_path / "b.pcapng")
    assert stats.truncated and got == scapy_flows(pkts[:-1])


def test_malformed_packets_are_counted_and_skipped(tmp_path):
    good = raw(ETH() / IP(src=SRC4, dst=DST4) / UDP(sport=5, dport=53))
    liar = bytearray(good)
    liar[16:18] = struct.pack(">H", 1500)  # IPv4 total length beyond the frame on the wire
    short = good[:20]  # cut inside the IP header
    bad_ver = bytearray(good)
    bad_ver[14] = 0x75
    path = write_pcap(tmp_path / "bad.pcap", [(1.0, good), (1.0, bytes(liar)), (1.0, short), (1.0, bytes(bad_ver))])
    got, stats = ours(path)
    assert stats.malformed == 3 and stats.packets == 4
    assert got == {(17, SRC4, 5, DST4, 53): [1, len(good) - 14]}


def test_snaplen_cut_packets_count_wire_length(tmp_path):
    full = raw(ETH() / IP(src=SRC4, dst=DST4) / TCP(sport=9, dport=443) / Raw(bytes(1000)))
    path = write_pcap(tmp_path / "snap.pcap", [(1.0, full[:96], len(full))], snaplen=96)
    got, stats = ours(path)
    assert got == {(6, SRC4, 9, DST4, 443): [1, len(full) - 14]} and stats.malformed == 0


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (bytes(random.Random(1).randbytes(4096)), "not a pcap or pcapng"),
    (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\xde\xad\xbe\xef", "byte-order magic"),
])
def test_unreadable_files_are_user_errors(tmp_path, content, message):
    p = tmp_path / "junk"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_capture(str(p))


def test_corrupt_record_length_stops_with_warning(tmp_path):
    good = raw(ETH() / IP(src=SRC4, dst=DST4) / UDP(sport=5, dport=53))
    path = write_pcap(tmp_path / "c.pcap", [(1.0, good), (1.0, good)])
    data = bytearray(open(path, "rb").read())
    off = 24 + 16 + len(good)
    data[off + 8:off + 12] = struct.pack("<I", 0x7FFFFFFF)
    open(path, "wb").write(bytes(data))
    got, stats = ours(path)
    assert stats.truncated and stats.truncated_offset == off and "corrupt record header" in stats.warnings[0]
    assert got == {(17, SRC4, 5, DST4, 53): [1, len(good) - 14]}


def test_unsupported_link_type_is_reported(tmp_path):
    path = write_pcap(tmp_path / "u.pcap", [(1.0, b"\x00" * 40)], linktype=147)
    cap = read_capture(path)
    assert cap.stats.unsupported == 1 and "link type 147" in cap.stats.warnings[0]


def test_address_spelling_equals_ipaddress():
    """The capture path names addresses with inet_ntop; it must spell them as ipaddress does."""
    import ipaddress
    import random

    from agent.sources.capfile.flows import FlowAccumulator

    rnd = random.Random(4)
    t = FlowAccumulator()
    samples = [rnd.getrandbits(128) for _ in range(3000)]
    samples += [rnd.getrandbits(16) << rnd.choice((0, 16, 48, 96, 112)) for _ in range(3000)]  # zero runs
    samples += [0xFFFF << 32 | rnd.getrandbits(32), 1, 0, rnd.getrandbits(32)]
    for n in samples:
        t.by_key[(6 << 40, n >> 64, n & (2**64 - 1), n >> 64, n & (2**64 - 1))] = [1, 0, 0.0, 0.0, 0]
    for f in t.flows("pcap"):
        assert f.src == str(ipaddress.IPv6Address(f.src)), f.src
