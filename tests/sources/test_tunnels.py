"""Tunnelled packets: the inner packet of GRE and GTP-U, decoded by hand, equals scapy's dissection;
a capture's tunnels add their inner flows the same way on the C and the Python walk."""

import ipaddress

import pytest
from scapy.all import GRE, IP, TCP, UDP, Ether, IPv6, Raw, raw, wrpcap
from scapy.contrib.gtp import GTP_U_Header, GTPPDUSessionContainer

from agent.sources.capfile import reader as pcap
from agent.sources.capfile import walk as pcap_walk
from agent.wire.decode import ETHERNET, tunnel_inner

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
INNER4 = IP(src="10.9.0.1", dst="203.0.113.41") / UDP(sport=5000, dport=53) / Raw(b"q" * 20)
INNER6 = IPv6(src="2001:db8:1::9", dst="2001:db8:77::1") / TCP(sport=40000, dport=443)

CASES = [
    ("gre", E / IP(src="10.0.0.5", dst="203.0.113.11") / GRE() / INNER4),
    ("gre", E / IP(src="10.0.0.5", dst="203.0.113.11") / GRE(key_present=1, key=7, seqnum_present=1, sequence_number=9,
                                                             chksum_present=1) / INNER4),
    ("gre", E / IPv6(src="2001:db8:1::5", dst="2001:db8:5::9") / GRE() / INNER6),
    ("gtp-u", E / IP(src="10.0.0.5", dst="203.0.113.15") / UDP(sport=2152, dport=2152)
     / GTP_U_Header(teid=42) / INNER4),
    ("gtp-u", E / IP(src="10.0.0.5", dst="203.0.113.15") / UDP(sport=2152, dport=2152)
     / GTP_U_Header(teid=42, E=1, next_ex=0x85) / GTPPDUSessionContainer(QFI=5) / INNER6),
]


@pytest.mark.parametrize("kind,pkt", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_inner_packet_equals_scapy(kind, pkt):
    data = raw(pkt)
    got = tunnel_inner(ETHERNET, data, len(data))
    assert got is not None and got[0] == kind
    ips = [layer for layer in pkt.iterpayloads() if isinstance(layer, (IP, IPv6))]
    inner = ips[1]  # the tunnelled packet, as scapy dissects it
    d = got[1]
    width = 4 if inner.version == 4 else 16
    assert ipaddress.ip_address(d.src[-width:]) == ipaddress.ip_address(inner.src)
    assert ipaddress.ip_address(d.dst[-width:]) == ipaddress.ip_address(inner.dst)
    assert (d.sport, d.dport) == (inner.payload.sport, inner.payload.dport)


def test_not_a_tunnel_or_unreadable_is_none():
    plain = raw(E / IP(src="10.0.0.5", dst="203.0.113.9") / UDP(sport=2152, dport=9) / Raw(b"\x00" * 8))
    assert tunnel_inner(ETHERNET, plain, len(plain)) is None  # port 2152, but not a G-PDU
    cut = raw(CASES[0][1])[:40]
    assert tunnel_inner(ETHERNET, cut, 200) is None


@pytest.mark.parametrize("c_walk", [True, False])
def test_capture_adds_inner_flows_on_both_walks(tmp_path, monkeypatch, c_walk):
    monkeypatch.setitem(pcap_walk.WALK, "c", c_walk)
    pkts = [p for _, p in CASES]
    for i, p in enumerate(pkts):
        p.time = 1748772000 + i
    path = tmp_path / "t.pcap"
    wrpcap(str(path), pkts)
    cap = pcap.read_capture(str(path))
    inner = sorted((f.source, f.dst, f.dport) for f in cap.flows if ":" in f.source)
    assert inner == sorted([("pcap:gre", "203.0.113.41", 53)] * 1 + [("pcap:gre", "2001:db8:77::1", 443)]
                           + [("pcap:gtp-u", "203.0.113.41", 53), ("pcap:gtp-u", "2001:db8:77::1", 443)])
    gre4 = [f for f in cap.flows if f.source == "pcap:gre" and f.dst == "203.0.113.41"]
    assert gre4[0].packets == 2  # the two GRE packets to the same inner flow are one flow
    assert any("GRE or GTP-U" in w for w in cap.stats.to_json()["warnings"])
