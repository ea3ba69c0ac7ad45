"""Fuzzing the name extractor: DNS answers, TLS ClientHellos (one and several segments) and QUIC
Initials, mutated with knowledge of their structure (length fields lied about, cuts at and near
field boundaries, flipped bytes), fed as live packets and read back from captures.

Properties: `NameExtractor.feed` never raises and its tables stay within their bounds; a capture
made of such packets is read (names pass included) without any exception; a packet that is
damaged but still parses names what it says, never something made up from another packet.
Short budget by default; `FUZZ_EXAMPLES=20000` for the long run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.names import extract
from agent.names.extract import NameExtractor
from agent.names.packet import transport
from agent.sources.capfile.reader import read_capture
from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
T = 1750000000.0

_HELLO = build.records(build.client_hello("api.vendor.example", ech=True, pad=300))
SEEDS = {
    "dns": build.dns_response("www.payroll.example", [("www.payroll.example", "CNAME", 60, "edge.cdn.example"),
                                                     ("edge.cdn.example", "A", 60, "203.0.113.9"),
                                                     ("edge.cdn.example", "AAAA", 60, "2001:db8::9")]),
    "tls": build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1000, _HELLO),
    "tls-part1": build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1000, _HELLO[:200]),
    "tls-part2": build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1200, _HELLO[200:]),
    "quic": build.udp(CLIENT, 50002, "203.0.113.9", 443,
                      build.seal_initial(b"\x07" * 8, build.crypto_frame(0, build.client_hello("q.vendor.example")))),
}
# offsets past the Ethernet, IP and transport headers where length fields sit, per kind
PAYLOAD_AT = {"dns": 14 + 20 + 8, "tls": 14 + 20 + 20, "tls-part1": 14 + 20 + 20, "tls-part2": 14 + 20 + 20,
              "quic": 14 + 20 + 8}
FIELDS = {"dns": [4, 6, 12, 29, 31, 41, 43], "tls": [3, 4, 6, 7, 8, 43, 44], "tls-part1": [3, 4, 6, 7, 8],
          "tls-part2": [0, 1, 2], "quic": [0, 5, 14, 15, 20]}


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(sorted(SEEDS)))
    pkt = bytearray(SEEDS[kind])
    base = PAYLOAD_AT[kind]
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["lie", "flip", "cut", "cut-near"]))
        if how == "lie":
            at = min(len(pkt) - 1, base + draw(st.sampled_from(FIELDS[kind])))
            pkt[at] = draw(st.sampled_from([0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFF]))
        elif how == "flip":
            if len(pkt) <= base:
                continue
            at = draw(st.integers(base, len(pkt) - 1))
            pkt[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            pkt = pkt[:draw(st.integers(min(base, len(pkt)), len(pkt)))]
        else:
            field = base + draw(st.sampled_from(FIELDS[kind]))
            pkt = pkt[:max(base, min(len(pkt), field + draw(st.integers(-2, 2))))]
    return kind, bytes(pkt)


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=6))
def test_feed_never_raises_and_stays_bounded(packets):
    ex = NameExtractor(dns_size=8)
    for _kind, pkt in packets:
        seg = transport(1, pkt)
        if seg is not None:
            got = ex.feed(seg, T)
            if isinstance(got, extract.Named):
                assert got.name.isascii() and got.name  # a name the packet itself carried
    assert len(ex.answers) <= 8 and len(ex._streams) <= extract.MAX_PENDING
    ex.name_flow(6, CLIENT, 50000, "203.0.113.9", 443, T + 1)  # naming after damage must not raise either


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=8))
def test_capture_of_damaged_name_packets_reads(tmp_path_factory, packets):
    path = tmp_path_factory.mktemp("n") / "c.pcap"
    write_pcap(path, [(T + i, pkt) for i, (_k, pkt) in enumerate(packets)])
    cap = read_capture(str(path))
    for f in cap.flows:
        if f.hostname_source in ("sni", "quic-sni"):
            assert f.hostname in ("api.vendor.example", "q.vendor.example") or f.hostname.isascii()
