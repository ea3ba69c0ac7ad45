"""The hand decoder equals pyroute2's parser on real kernel messages (root, own namespaces)."""

import socket
import struct
import time

import pytest

from agent.sources.conntrack import table as C
from agent.wire import netlink as nl
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]


# One ICMP and one ICMPv6 echo request from raw sockets (no ping binary needed).
ECHO = """
import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); return ~(s + (s >> 16)) & 0xffff
msg = struct.pack('!BBHHH', 8, 0, 0, 77, 1) + b'ping'
msg = msg[:2] + struct.pack('!H', csum(msg)) + msg[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(msg, ('198.51.100.7', 0))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s6.sendto(struct.pack('!BBHHH', 128, 0, 0, 78, 1) + b'ping', ('2001:db8:de::7', 0))
"""


def raw_dump(netns):
    """Every ctnetlink message of one dump, as the kernel sent it (header included)."""
    s = nl.open_socket(nl.NETLINK_NETFILTER, 0, netns)
    mtype, flags, payload = C._dump_request()
    nl.request(s, mtype, flags, payload)
    out = []
    while True:
        data = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            length, mt = struct.unpack_from("=IH", data, off)
            if mt == nl.NLMSG_DONE:
                s.close()
                return out
            out.append(data[off:off + length])
            off += (length + 3) & ~3


def pyroute2_view(msg: bytes):
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    m = nfct_msg(msg)
    m.decode()
    orig, reply = m.get_attr("CTA_TUPLE_ORIG"), m.get_attr("CTA_TUPLE_REPLY")

    def tup(t):
        ip, pr = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
        src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
        dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
        return (src, dst, pr.get_attr("CTA_PROTO_NUM"), pr.get_attr("CTA_PROTO_SRC_PORT") or 0,
                pr.get_attr("CTA_PROTO_DST_PORT") or 0)

    counters = m.get_attr("CTA_COUNTERS_ORIG")
    ts = m.get_attr("CTA_TIMESTAMP")
    return {"id": m.get_attr("CTA_ID"), "orig": tup(orig), "reply": tup(reply),
            "packets": counters.get_attr("CTA_COUNTERS_PACKETS") if counters else 0,
            "bytes": counters.get_attr("CTA_COUNTERS_BYTES") if counters else 0,
            "start": ts.get_attr("CTA_TIMESTAMP_START") if ts else 0}


def canon(a):
    return socket.inet_ntop(socket.AF_INET6 if ":" in a else socket.AF_INET,
                            socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a))


def test_decoder_equals_pyroute2_on_real_messages():
    with Topology("eact") as t:
        t.enable_conntrack()
        server = t.serve()
        time.sleep(0.5)
        clients = [t.connect("tcp", "203.0.113.9", hold=5)[0], t.connect("tcp", "2001:db8:5::9", hold=5)[0],
                   t.connect("udp", "203.0.113.140", port=53, hold=5)[0],
                   t.connect("udp", "2001:db8:de::7", port=123, hold=5)[0]]
        t.run("python3", "-c", ECHO)
        # DNAT: the original destination differs from where the reply comes from.
        t.run("nft", "-f", "-", input="table ip natt {\n chain out { type nat hook output priority -100; "
                                      "ip daddr 203.0.113.77 tcp dport 443 dnat to 203.0.113.10; }\n}\n")
        clients.append(t.connect("tcp", "203.0.113.77", hold=5)[0])
        time.sleep(0.3)
        msgs = raw_dump(t.client)
        for c in clients:
            c.kill()
        server.kill()
    assert len(msgs) >= 6
    protos = set()
    for msg in msgs:
        ours = C.decode_entry(msg, 16, len(msg))
        ref = pyroute2_view(msg)
        o = ref["orig"]
        assert (ours.src, ours.dst, ours.proto, ours.sport, ours.dport) == (canon(o[0]), canon(o[1]), o[2], o[3], o[4])
        assert (ours.ct_id, ours.packets, ours.bytes, ours.start_ns) == (
            ref["id"], ref["packets"], ref["bytes"], ref["start"])
        r = ref["reply"]
        assert ours.nat_dst == (canon(r[0]) if canon(r[0]) != ours.dst else None)
        if C._ctnl is not None:  # the C event reader decodes the kernel's messages alike
            assert C._ctnl.decode(msg, C.CtEntry) == ours
        protos.add(ours.proto)
    assert {6, 17, 1, 58} <= protos
    # The learned-layout fast path gives the same entries as the generic decoder: every message is
    # decoded twice through one Decoder (the first pass learns its layout, the second uses it).
    dec = C.Decoder()
    for msg in msgs + msgs:
        assert dec.entry(msg, 16, len(msg)) == C.decode_entry(msg, 16, len(msg))
    assert any(lay is not None for lay in dec.layouts.values())
    natted = [C.decode_entry(m, 16, len(m)) for m in msgs]
    assert any(e.dst == "203.0.113.77" and e.nat_dst == "203.0.113.10" for e in natted)


def test_a_layout_is_used_only_where_every_header_matches():
    with Topology("eacl") as t:
        t.enable_conntrack(udp_timeout=300)
        t.fill_udp(50)
        msgs = raw_dump(t.client)
    dec = C.Decoder()
    first = msgs[0]
    dec.entry(first, 16, len(first))
    lay = dec.layouts[len(first) - 16]
    assert lay is not None
    # Same length, different structure (a header's type changed): must not be read by the template.
    forged = bytearray(first)
    forged[16 + 4 + 2] ^= 0x01  # type of the first top-level attribute
    assert dec.entry(bytes(forged), 16, len(forged)) == C.decode_entry(bytes(forged), 16, len(forged))
    for m in msgs:
        assert dec.entry(m, 16, len(m)) == C.decode_entry(m, 16, len(m))


def test_decoder_ignores_garbage():
    assert C.decode_entry(b"\x02\x00\x00\x00" + b"\x04\x00\x01\x80") is None
    assert C.decode_entry(b"") is None
    assert list(C.entries(b"\x00" * 40)) == []
