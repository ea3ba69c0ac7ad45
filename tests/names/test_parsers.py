"""The hand decoders for DNS, TLS and QUIC against scapy and the RFC test vectors; malformed input
is a counted `Malformed`, never another exception."""

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import DNS

from agent.names import dns, quic, tls
from tests.names import build

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
TLD = st.from_regex(r"[a-z]{2,6}", fullmatch=True)  # a name ending in letters is never an IP literal
NAME = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=1, max_size=4), TLD)


def _payload(frame: bytes) -> bytes:
    from scapy.all import Ether
    return bytes(Ether(frame)["DNS"])


@settings(max_examples=150, deadline=None)
@given(qname=NAME, chain=st.lists(NAME, max_size=3, unique=True),
       addrs=st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), min_size=1, max_size=3, unique=True),
       ttls=st.lists(st.integers(0, 86400), min_size=8, max_size=8))
def test_dns_answers_equal_scapy(qname, chain, addrs, ttls):
    names = [qname] + [c for c in chain if c != qname]
    answers = [(names[i], "CNAME", ttls[i], names[i + 1]) for i in range(len(names) - 1)]
    answers += [(names[-1], "A" if a.version == 4 else "AAAA", ttls[4 + k], str(a)) for k, a in enumerate(addrs)]
    msg = _payload(build.dns_response(qname, answers))
    got = dns.parse_response(msg)
    ref = DNS(msg)
    assert len(ref.an) == len(answers)
    assert got.qname == ref.qd[0].qname.decode().rstrip(".")
    ref_rr = [(r.rrname.decode().rstrip("."), r.type, r.ttl,
               r.rdata.decode().rstrip(".") if r.type == 5 else ipaddress.ip_address(r.rdata).packed)
              for r in ref.an]
    assert [(r.owner, r.rtype, r.ttl, r.data) for r in got.answers] == ref_rr
    link_ttl = min([ttls[i] for i in range(len(names) - 1)], default=None)
    want = {(a.packed, min(ttls[4 + k], link_ttl) if link_ttl is not None else ttls[4 + k], tuple(names))
            for k, a in enumerate(addrs)}
    assert set(got.addresses()) == want


def test_dns_ignores_addresses_the_question_does_not_lead_to():
    msg = _payload(build.dns_response("a.example", [("a.example", "A", 60, "192.0.2.1"),
                                                    ("other.example", "A", 60, "192.0.2.2")]))
    assert [a[0] for a in dns.parse_response(msg).addresses()] == [socket.inet_aton("192.0.2.1")]


def test_dns_every_truncation_is_malformed_or_fewer_answers():
    msg = _payload(build.dns_response("www.payroll.example", [("www.payroll.example", "CNAME", 60, "edge.cdn.example"),
                                                              ("edge.cdn.example", "A", 60, "203.0.113.9")]))
    for n in range(len(msg)):
        try:
            dns.parse_response(msg[:n])
        except dns.Malformed:
            pass


def test_dns_compression_loop_and_bad_pointer():
    head = bytes.fromhex("000781800001000100000000")
    looped = head + b"\xc0\x0c" + b"\x00\x01\x00\x01"  # the question name points at itself
    with pytest.raises(dns.Malformed, match="loop"):
        dns.parse_response(looped)
    with pytest.raises(dns.Malformed):
        dns.parse_response(head + b"\xc0\xff\x00\x01\x00\x01")
    with pytest.raises(dns.Malformed, match="query"):
        dns.parse_response(bytes(12))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_dns_random_bytes(data):
    try:
        dns.parse_response(data)
    except dns.Malformed:
        pass


def test_dns_non_ascii_label_is_escaped():
    msg = bytearray(_payload(build.dns_response("ab.example", [("ab.example", "A", 5, "192.0.2.1")])))
    msg[13] = 0xE9  # 'a' -> a byte outside ASCII in the question
    r = dns.parse_response(bytes(msg))
    assert r.qname == "\\233b.example"


# -- TLS ----------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(name=NAME, ech=st.booleans(), split=st.integers(1, 60))
def test_sni_equal_scapy(name, ech, split):
    from scapy.layers.tls.record import TLS

    hello = build.client_hello(name, ech=ech)
    stream = build.records(hello)
    got = tls.client_hello_from_records(stream)
    ref = TLS(stream).msg[0].ext[0].servernames[0].servername.decode()
    assert got == tls.Hello(ref, ech)
    # the same hello in two records, and every prefix of the stream still waits for more
    assert tls.client_hello_from_records(build.records(hello, split)) == tls.Hello(name, ech)
    for n in (1, 5, 6, len(stream) // 2, len(stream) - 1):
        assert tls.client_hello_from_records(stream[:n]) == tls.NEED_MORE


def test_sni_ip_literal_and_absent():
    assert tls.client_hello_from_records(build.records(build.client_hello("192.0.2.7"))) == tls.Hello(None, False)
    assert tls.client_hello_from_records(build.records(build.client_hello(None))) == tls.Hello(None, False)
    assert tls.client_hello_from_records(b"GET / HTTP/1.1\r\n") == tls.NOT_TLS
    assert tls.client_hello_from_records(b"\x16\x03\x01\x00\x05\x02") == tls.NOT_TLS  # ServerHello


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(5, 200), value=st.integers(0, 255))
def test_sni_mutations_never_raise_anything_else(pos, value):
    stream = bytearray(build.records(build.client_hello("api.vendor.example")))
    stream[pos % len(stream)] = value
    try:
        got = tls.client_hello_from_records(bytes(stream))
    except tls.Malformed:
        return
    assert got in (tls.NEED_MORE, tls.NOT_TLS) or isinstance(got, tls.Hello)


# -- QUIC ---------------------------------------------------------------------------------------

def test_initial_keys_match_rfc_vectors():
    dcid = bytes.fromhex("8394c8f03e515708")
    aead, iv, hp = quic.client_keys(dcid, quic.V1)
    assert iv.hex() == "fa044b2f42a3fd3b46fb255c"  # RFC 9001 appendix A.1
    assert build.initial_keys(dcid, 1) == (bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"), iv,
                                           bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"))
    _, iv2, _ = quic.client_keys(dcid, quic.V2)
    assert iv2.hex() == "91f73e2351d8fa91660e909f"  # RFC 9369 appendix A.1
    assert build.initial_keys(dcid, quic.V2)[0].hex() == "8b1a0bc121284290a29e0971b5cd045d"


@pytest.mark.parametrize("version", [quic.V1, quic.V2, 0xFF00001D, 0xFF00001B])
def test_initial_opens_and_names(version):
    hello = build.client_hello("video.example")
    pkt = build.seal_initial(b"\x11" * 8, build.crypto_frame(0, hello), version=version)
    ((dcid, plain),) = quic.open_initials(pkt)
    assert dcid == b"\x11" * 8
    ((ofs, data),) = quic.crypto_frames(plain)
    assert (ofs, tls.parse_client_hello(data)) == (0, tls.Hello("video.example", False))


def test_initial_tampered_or_cut():
    pkt = bytearray(build.seal_initial(b"\x22" * 8, build.crypto_frame(0, build.client_hello("a.example"))))
    pkt[100] ^= 1
    with pytest.raises(quic.Undecryptable):
        quic.open_initials(bytes(pkt))
    with pytest.raises(quic.Malformed):
        quic.open_initials(bytes(pkt[:30]))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=1300))
def test_initial_random_bytes(data):
    data = bytes([data[0] | 0xC0]) + b"\x00\x00\x00\x01" + data[1:]
    try:
        quic.open_initials(data)
    except (quic.Malformed, quic.Undecryptable):
        pass


def test_assembler_joins_pieces_in_any_order():
    hello = build.client_hello("big.example", pad=2500)
    a = quic.Assembler(size=2)
    assert a.add(("k",), [(1500, hello[1500:])]) is None
    assert a.add(("k",), [(700, hello[700:1500]), (0, hello[:700])]) == hello
    a.add(("x",), [(5, b"zz")])
    a.add(("y",), [(5, b"zz")])
    a.add(("z",), [(5, b"zz")])
    assert a.evicted == 1
