"""Names on flows from captures, end to end: `audit --flows` on captures built with scapy."""

import json

import pytest

from agent.names import quic
from agent.sources.capfile import walk as pcap
from agent.sources.capfile.reader import read_capture
from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT

T = 1750000000.0


@pytest.fixture(autouse=True, params=["c", "python"])
def walk(request, monkeypatch):
    """Every capture here is read both ways: names from the candidates the C walk hands over during the
    walk, and from the Python second walk (pcapng and builds without the C module)."""
    if request.param == "c" and pcap._c_walk is None:
        pytest.skip("C accelerator not built")
    monkeypatch.setitem(pcap.WALK, "c", request.param == "c")
    return request.param


DOC_PUBLIC = ["--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24", "--public-net", "2001:db8::/32"]


def _capture(tmp_path, frames, name="names.pcap"):
    return write_pcap(tmp_path / name, frames)


def _names(path):
    return {(f.dst, f.sport): (f.hostname, f.hostname_source, f.hostname_chain)
            for f in read_capture(path).flows if f.src == CLIENT}


def test_dns_then_connect_names_the_flow_until_the_answer_expires(tmp_path):
    answer = build.dns_response("www.payroll.example", [("www.payroll.example", "CNAME", 60, "edge.cdn.example"),
                                                       ("edge.cdn.example", "A", 300, "203.0.113.9")])
    frames = [
        (T - 1, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, flags="S")),  # before the answer: no name
        (T - 0.01, build.dns_query("www.payroll.example")),
        (T, answer),
        (T + 1, build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1, flags="S")),
        (T + 60 + 30 - 1, build.tcp(CLIENT, 50002, "203.0.113.9", 443, 1, flags="S")),  # TTL 60 (chain) + grace
        (T + 60 + 30 + 1, build.tcp(CLIENT, 50003, "203.0.113.9", 443, 1, flags="S")),  # expired
        (T + 2, build.tcp("192.0.2.11", 50004, "203.0.113.9", 443, 1, flags="S")),  # another client: not told
    ]
    path = _capture(tmp_path, frames)
    got = _names(path)
    chain = ("www.payroll.example", "edge.cdn.example")
    assert got[("203.0.113.9", 50000)] == (None, None, ())
    assert got[("203.0.113.9", 50001)] == ("www.payroll.example", "dns", chain)
    assert got[("203.0.113.9", 50002)] == ("www.payroll.example", "dns", chain)
    assert got[("203.0.113.9", 50003)] == (None, None, ())
    other = [f for f in read_capture(path).flows if f.src == "192.0.2.11"]
    assert other[0].hostname is None


def test_most_recent_answer_to_that_client_wins(tmp_path):
    frames = [(T - 0.01, build.dns_query("old.example")),
              (T, build.dns_response("old.example", [("old.example", "A", 600, "203.0.113.9")])),
              (T + 0.99, build.dns_query("new.example")),
              (T + 1, build.dns_response("new.example", [("new.example", "A", 600, "203.0.113.9")])),
              (T + 2, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, flags="S"))]
    assert _names(_capture(tmp_path, frames))[("203.0.113.9", 50000)][0] == "new.example"


def test_sni_in_one_segment_two_segments_out_of_order_and_ech(tmp_path):
    one = build.records(build.client_hello("api.vendor.example"))
    two = build.records(build.client_hello("split.vendor.example", pad=1800))
    ech = build.records(build.client_hello("public.ech.example", ech=True))
    frames = [
        (T - 0.01, build.dns_query("dns-name.example")),
        (T, build.dns_response("dns-name.example", [("dns-name.example", "A", 600, "203.0.113.9")])),
        (T + 1, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1000, one)),  # SNI wins over DNS
        (T + 2, build.tcp(CLIENT, 50001, "203.0.113.10", 443, 5000, two[:1000])),
        (T + 3, build.tcp(CLIENT, 50001, "203.0.113.10", 443, 5000, two[:1000])),  # a retransmission
        (T + 4, build.tcp(CLIENT, 50001, "203.0.113.10", 443, 6000, two[1000:])),
        (T + 5, build.tcp(CLIENT, 50002, "203.0.113.11", 443, 9000 + 700, two[700:])),  # later part first
        (T + 6, build.tcp(CLIENT, 50002, "203.0.113.11", 443, 9000, two[:700])),
        (T + 7, build.tcp(CLIENT, 50003, "203.0.113.12", 443, 1, ech)),
        (T + 8, build.tcp(CLIENT, 50004, "203.0.113.13", 443, 1, build.records(build.client_hello("192.0.2.1")))),
    ]
    got = _names(_capture(tmp_path, frames))
    assert got[("203.0.113.9", 50000)][:2] == ("api.vendor.example", "sni")
    assert got[("203.0.113.10", 50001)][:2] == ("split.vendor.example", "sni")
    assert got[("203.0.113.11", 50002)][:2] == ("split.vendor.example", "sni")
    assert got[("203.0.113.12", 50003)][:2] == ("public.ech.example", "sni")
    assert got[("203.0.113.13", 50004)][:2] == (None, None)  # an IP literal is not a name


def test_quic_v1_and_v2_initials_one_hello_over_two_packets(tmp_path):
    big = build.client_hello("quic.vendor.example", pad=1500)
    cut = 900
    v1a = build.seal_initial(b"\x01" * 8, build.crypto_frame(0, big[:cut]), version=quic.V1, pn=0)
    v1b = build.seal_initial(b"\x01" * 8, build.crypto_frame(cut, big[cut:]), version=quic.V1, pn=1)
    v2 = build.seal_initial(b"\x02" * 8, build.crypto_frame(0, build.client_hello("v2.vendor.example")),
                            version=quic.V2)
    frames = [(T, build.udp(CLIENT, 50000, "203.0.113.20", 443, v1b)),  # the second half first
              (T + 0.01, build.udp(CLIENT, 50000, "203.0.113.20", 443, v1a)),
              (T + 1, build.udp(CLIENT, 50001, "203.0.113.21", 443, v2))]
    cap = read_capture(_capture(tmp_path, frames))
    got = {f.dst: (f.hostname, f.hostname_source) for f in cap.flows}
    assert got["203.0.113.20"] == ("quic.vendor.example", "quic-sni")
    assert got["203.0.113.21"] == ("v2.vendor.example", "quic-sni")
    assert cap.stats.names["quic_initials"] == 3


def test_malformed_names_are_counted_not_fatal(tmp_path):
    good = build.dns_response("ok.example", [("ok.example", "A", 600, "203.0.113.9")])
    from scapy.all import Ether
    bad_dns = build.udp(build.RESOLVER, 53, CLIENT, 40000, bytes(Ether(good)["DNS"])[:-3])  # answer cut short
    hello = bytearray(build.records(build.client_hello("x.example")))
    hello[6] = 0xFF  # the handshake length now claims 16 MB
    sealed = bytearray(build.seal_initial(b"\x03" * 8, build.crypto_frame(0, build.client_hello("q.example"))))
    sealed[5] = 200  # a connection ID length no version allows
    frames = [(T, bad_dns), (T + 1, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, bytes(hello))),
              (T + 2, build.udp(CLIENT, 50001, "203.0.113.9", 443, bytes(sealed))),
              (T + 2.99, build.dns_query("ok.example")), (T + 3, good),
              (T + 4, build.tcp(CLIENT, 50002, "203.0.113.9", 443, 1, flags="S"))]
    cap = read_capture(_capture(tmp_path, frames))
    assert (cap.stats.names["dns_malformed"], cap.stats.names["tls_malformed"],
            cap.stats.names["quic_malformed"]) == (1, 1, 1)
    assert any("malformed TLS ClientHello" in w for w in cap.stats.warnings)
    assert {f.sport: f.hostname for f in cap.flows if f.src == CLIENT}[50002] == "ok.example"


POLICY = """\
version: 1
name: vendor-eu
home: [EU]
names_override_location: {override}
trust_names: [sni, dns]  # names from these sources may excuse (the default: none)
allow:
  jurisdictions: [EU]
  hostnames: ["*.payroll.example", "bücher.example"]
deny:
  jurisdictions: [CN]
"""


def _hello(name):
    return build.records(build.client_hello(name))


def test_audit_flows_and_hostname_policies(cli, tmp_path, city_db):
    frames = [
        (T - 0.01, build.dns_query("xn--bcher-kva.example")),
        (T, build.dns_response("xn--bcher-kva.example", [("xn--bcher-kva.example", "A", 600, "203.0.113.140")])),
        (T + 1, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, _hello("eu.payroll.example"))),
        (T + 2, build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1, _hello("other.example"))),
        (T + 3, build.tcp(CLIENT, 50002, "203.0.113.140", 443, 1, flags="S")),  # CN, named bücher.example
        (T + 4, build.tcp(CLIENT, 50003, "10.1.1.1", 443, 1, flags="S")),  # not egress
    ]
    cap = _capture(tmp_path, frames)
    verdicts = {}
    for override in ("false", "true"):
        pol = tmp_path / f"p-{override}"
        pol.mkdir()
        (pol / "vendor-eu.yaml").write_text(POLICY.format(override=override))
        r = cli("audit", "--flows", "--format", "json", *DOC_PUBLIC, "--geoip-db", city_db, "--policies", pol, cap)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        rep = json.loads(r.stdout)
        rows = {f["sport"]: f for f in rep["flows"] if f["src"] == CLIENT}
        verdicts[override] = {s: f["verdicts"].get("vendor-eu") for s, f in rows.items()}
        assert set(rows[50000]) >= {"proto", "src", "sport", "dst", "dport", "packets", "bytes", "first_seen",
                                    "last_seen", "egress", "country", "hostname", "hostname_source", "verdicts"}
        assert (rows[50000]["hostname"], rows[50000]["hostname_source"], rows[50000]["country"],
                rows[50000]["egress"]) == ("eu.payroll.example", "sni", "US", True)
        assert (rows[50003]["egress"], rows[50003]["verdicts"]) == (False, {})
        msg = next(v["message"] for v in rep["violations"] if v["sport"] == 50001)
        assert msg.startswith("destination 203.0.113.9 (other.example, from TLS SNI; US")
    # a name in allow makes a US address compliant either way; only the override beats a denied country
    # 40000: the DNS answer's connection, opened by the client to its (local) resolver: not egress
    assert verdicts["false"] == {40000: None, 50000: "compliant", 50001: "violation", 50002: "violation", 50003: None}
    assert verdicts["true"] == {40000: None, 50000: "compliant", 50001: "violation", 50002: "compliant", 50003: None}
    r = cli("audit", "--flows", *DOC_PUBLIC, "--geoip-db", city_db, "--policies", tmp_path / "p-true", cap)
    assert "eu.payroll.example (sni)" in r.stdout and "Flows (" in r.stdout


SPOOF_POLICY = """\
version: 1
name: eu-vendor
home: [EU]
allow:
  jurisdictions: [EU]
  hostnames: ["*.example.eu"]
"""


def test_an_unsolicited_answer_names_nothing(cli, tmp_path, city_db):
    """One forged datagram from port 53 (no query asked, sent to a closed port) must not turn a US
    flow into a named, compliant one; it is counted as unsolicited. Answers to a query with another
    id, from another port, or after the window are unsolicited too; the matched one names its flow."""
    forged = build.dns_response("api.example.eu", [("api.example.eu", "A", 600, "203.0.113.9")])
    frames = [
        (T, forged),  # nobody asked
        (T + 1, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, flags="S")),
        (T + 2, build.dns_query("a.example.eu", qid=8)),
        (T + 2.1, build.dns_response("a.example.eu", [("a.example.eu", "A", 600, "203.0.113.10")])),  # id 7
        (T + 3, build.dns_query("b.example.eu", sport=40001)),
        (T + 3.1, build.dns_response("b.example.eu", [("b.example.eu", "A", 600, "203.0.113.11")])),  # to 40000
        (T + 4, build.dns_query("c.example.eu")),
        (T + 4 + 11, build.dns_response("c.example.eu", [("c.example.eu", "A", 600, "203.0.113.12")])),  # late
        (T + 16, build.dns_query("d.example.eu")),
        (T + 16.1, build.dns_response("d.example.eu", [("d.example.eu", "A", 600, "203.0.113.13")])),  # matched
        (T + 17, build.tcp(CLIENT, 50001, "203.0.113.10", 443, 1, flags="S")),
        (T + 17, build.tcp(CLIENT, 50002, "203.0.113.11", 443, 1, flags="S")),
        (T + 17, build.tcp(CLIENT, 50003, "203.0.113.12", 443, 1, flags="S")),
        (T + 17, build.tcp(CLIENT, 50004, "203.0.113.13", 443, 1, flags="S")),
    ]
    cap = _capture(tmp_path, frames)
    got = _names(cap)
    assert [got[(f"203.0.113.{i}", 50000 + k)][0] for k, i in enumerate((9, 10, 11, 12, 13))] == \
        [None, None, None, None, "d.example.eu"]
    assert read_capture(cap).stats.names["dns_unsolicited"] == 4
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "eu-vendor.yaml").write_text(SPOOF_POLICY)
    r = cli("audit", "--format", "json", *DOC_PUBLIC, "--geoip-db", city_db, "--policies", pol, cap)
    rep = json.loads(r.stdout)
    assert r.returncode == 1, r.stderr
    assert "203.0.113.9" in {v["dst"] for v in rep["violations"]}
    assert rep["inputs"][0]["names"]["dns_unsolicited"] == 4


def test_a_ttl_is_capped_at_a_day(tmp_path):
    frames = [(T - 0.01, build.dns_query("long.example")),
              (T, build.dns_response("long.example", [("long.example", "A", 2**31 - 1, "203.0.113.9")])),
              (T + 3600, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, flags="S")),
              (T + 2 * 86400, build.tcp(CLIENT, 50001, "203.0.113.9", 443, 1, flags="S"))]
    cap = _capture(tmp_path, frames)
    got = _names(cap)
    assert got[("203.0.113.9", 50000)][0] == "long.example" and got[("203.0.113.9", 50001)][0] is None
    assert read_capture(cap).stats.names["dns_ttl_capped"] == 1


def test_a_trusted_resolver_is_believed_without_the_query():
    from agent.names.extract import NameExtractor
    from agent.names.packet import transport
    from agent.sources.capture.source import trusted_resolvers
    from agent.wire.decode import ETHERNET

    answer = build.dns_response("api.example.eu", [("api.example.eu", "A", 600, "203.0.113.9")])
    seg = transport(ETHERNET, answer)
    for resolvers, named in ((set(), False), (trusted_resolvers([build.RESOLVER]), True)):
        ex = NameExtractor(resolvers=resolvers)
        ex.feed(seg, T)
        assert (ex.name_flow(6, CLIENT, 50000, "203.0.113.9", 443, T + 1) is not None) is named
    assert trusted_resolvers(None, resolv_conf="/nonexistent") == set()


def test_a_flood_of_partial_hellos_cannot_push_out_a_real_one_that_began_earlier(monkeypatch):
    """5,000 partial ClientHellos arrive between the two halves of a real split hello: the real one
    keeps its slot (the newest partial ones are dropped, and counted) and is named when it completes."""
    from agent.names import extract
    from agent.names.packet import transport
    from agent.wire.decode import ETHERNET

    monkeypatch.setattr(extract, "MAX_PENDING", 64)
    ex = extract.NameExtractor()
    real = build.records(build.client_hello("real.vendor.example", pad=1800))
    feed = lambda frame, at: ex.feed(transport(ETHERNET, frame), at)  # noqa: E731
    feed(build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1000, real[:700]), T)
    junk = build.records(build.client_hello("junk.example", pad=1800))[:700]
    for i in range(5000):
        feed(build.tcp(CLIENT, 10000 + i, "203.0.113.10", 443, 1, junk), T + 1)
    got = feed(build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1700, real[700:]), T + 2)
    assert got is not None
    assert ex.name_flow(6, CLIENT, 50000, "203.0.113.9", 443, T + 2).hostname == "real.vendor.example"
    assert ex.stats()["tls_streams_evicted"] >= 5000 - 64


def test_out_of_order_evictions_are_counted(monkeypatch):
    from agent.names import extract
    from agent.names.packet import transport
    from agent.wire.decode import ETHERNET

    monkeypatch.setattr(extract, "MAX_ORPHANS", 8)
    ex = extract.NameExtractor()
    for i in range(20):  # later parts of hellos whose starts never come
        ex.feed(transport(ETHERNET, build.tcp(CLIENT, 20000 + i, "203.0.113.9", 443, 5000, b"\x01" * 100)), T)
    assert ex.stats()["tls_orphans_evicted"] == 12


def test_quic_initials_that_cannot_be_a_first_flight_cost_no_crypto(monkeypatch):
    """A datagram whose DCID is shorter than a client's first Initial allows is dropped before any
    key derivation; past the per-second budget, Initials are counted, not opened."""
    from agent.names import extract, quic
    from agent.names.packet import transport
    from agent.wire.decode import ETHERNET

    opened = []
    real_open = quic.open_initials
    monkeypatch.setattr(quic, "open_initials", lambda d: opened.append(1) or real_open(d))
    ex = extract.NameExtractor()
    short = build.seal_initial(b"\x07" * 4, build.crypto_frame(0, build.client_hello("s.example")))
    ex.feed(transport(ETHERNET, build.udp(CLIENT, 50000, "203.0.113.9", 443, short)), T)
    assert not opened and ex.stats()["quic_not_first_flight"] == 1
    monkeypatch.setattr(extract, "QUIC_BUDGET", 3)
    hello = build.crypto_frame(0, build.client_hello("b.example"))
    for i in range(5):
        sealed = build.seal_initial(bytes([i]) * 8, hello)
        ex.feed(transport(ETHERNET, build.udp(CLIENT, 50001 + i, "203.0.113.9", 443, sealed)), T + 1)
    assert len(opened) == 3 and ex.stats()["quic_over_budget"] == 2


def test_a_greased_version_sealed_with_v1_keys_is_named_and_others_are_counted(tmp_path):
    """A client Initial with a reserved version (0x?a?a?a?a) that was sealed with the v1 salt, as
    interop clients do, names its flow; one that does not open with v1's keys is counted, not guessed."""
    hello = build.crypto_frame(0, build.client_hello("greased.vendor.example"))
    greased = build.seal_initial(b"\x09" * 8, hello, version=0x1A2A3A4A, keys_of=1)
    unknown = build.seal_initial(b"\x0a" * 8, hello, version=0x5A6A7A8A, keys_of=0x6B3343CF)  # not v1's keys
    frames = [(T, build.udp(CLIENT, 50000, "203.0.113.30", 443, greased)),
              (T + 1, build.udp(CLIENT, 50001, "203.0.113.31", 443, unknown))]
    cap = read_capture(_capture(tmp_path, frames))
    got = {f.dst: (f.hostname, f.hostname_source) for f in cap.flows}
    assert got["203.0.113.30"] == ("greased.vendor.example", "quic-sni")
    assert got["203.0.113.31"] == (None, None)
    assert cap.stats.names["quic_unknown_version"] == 1


def test_queries_keyed_in_c_match_answers_keyed_in_python(tmp_path):
    """Queries the C walk keys itself (plain IPv4 and IPv6) and those left to Python (VLAN-tagged,
    IPv6 with an extension header; all of them on the Python walk) match their answers, which Python
    keys: mixed-case names (0x20), EDNS, and a query that is not one (too short) is ignored."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRROPT
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Dot1Q, Ether

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    shapes = [(CLIENT, build.RESOLVER, False, False), (CLIENT, build.RESOLVER, False, True),
              ("2001:db8::5", "2001:db8::53", False, False), ("2001:db8::6", "2001:db8::53", True, False)]
    frames, t, want = [], T, {}
    for i, (cl, rs, ext, vlan) in enumerate(shapes):
        name, addr = f"Host{i}.ExAmple.EU", f"203.0.113.{60 + i}"
        mk = (lambda s, d: IPv6(src=s, dst=d) / IPv6ExtHdrHopByHop()) if ext else \
            (lambda s, d: IPv6(src=s, dst=d)) if ":" in cl else (lambda s, d: IP(src=s, dst=d))
        l2 = eth / Dot1Q(vlan=7) if vlan else eth
        q = DNS(id=200 + i, qr=0, rd=1, qd=[DNSQR(qname=name)], ar=[DNSRROPT()] if i % 2 else [])
        r = DNS(id=200 + i, qr=1, rd=1, ra=1, qd=[DNSQR(qname=name)], an=[DNSRR(rrname=name, ttl=600, rdata=addr)])
        frames += [(t, bytes(l2 / mk(cl, rs) / UDP(sport=41000 + i, dport=53) / q)),
                   (t + 0.01, bytes(l2 / mk(rs, cl) / UDP(sport=53, dport=41000 + i) / r)),
                   (t + 0.02, bytes(l2 / mk(cl, addr if ":" not in cl else "2001:db8::99") / TCP(sport=50100 + i,
                                                                                              dport=443, flags="S")))]
        if ":" not in cl:
            want[(addr, 50100 + i)] = name.lower()
        t += 1
    frames.append((t, bytes(eth / IP(src=CLIENT, dst=build.RESOLVER) / UDP(sport=40009, dport=53) / (b"\x00" * 5))))
    cap = read_capture(_capture(tmp_path, frames))
    got = {(f.dst, f.sport): f.hostname for f in cap.flows if f.sport >= 50100}
    assert {k: got[k] for k in want} == want
    assert cap.stats.names["dns_queries"] == 4 and not cap.stats.names.get("dns_unsolicited")


def test_name_table_refusals_and_evictions_reach_the_metrics():
    """Counted is not enough: the capture source exports every refusal and eviction kind as
    egress_agent_name_events_total{kind} (bounded labels), once, however often it exports."""
    from prometheus_client import generate_latest

    from agent.names.extract import NAME_EVENTS, NameExtractor
    from agent.names.packet import transport
    from agent.sinks.metrics import Metrics
    from agent.sources.capture.source import CaptureNames
    from agent.wire.decode import ETHERNET

    ex = NameExtractor()
    forged = build.dns_response("x.example", [("x.example", "A", 600, "203.0.113.9")])
    for _ in range(3):
        ex.feed(transport(ETHERNET, forged), T)
    m = Metrics()
    reader = CaptureNames(ex, metrics=m)
    reader._export()
    reader._export()
    text = generate_latest(m.registry).decode()
    assert 'egress_agent_name_events_total{kind="dns_unsolicited"} 3.0' in text
    assert set(NAME_EVENTS) >= {"dns_unsolicited", "tls_streams_evicted", "quic_over_budget", "named_evicted"}


def test_a_configured_resolver_that_is_not_an_address_is_a_clear_error(tmp_path):
    from agent.errors import UserError
    from agent.sources.capture.source import trusted_resolvers

    with pytest.raises(UserError, match="capture.resolvers: 'dns.example' is not an IP address"):
        trusted_resolvers(["192.0.2.53", "dns.example"])
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver garbage\nsearch example\n")
    assert trusted_resolvers(None, str(conf)) == {bytes.fromhex("fe800000000000000000000000000001")}


def test_the_longest_dns_names_are_keyed_alike_in_c_and_python(tmp_path):
    """Queries whose question fills the key buffer (a 255-octet name) and one a byte past it: the
    longest is matched to its answer on both walks, the over-long one is ignored on both."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters: 255 octets on the wire
    frames = []
    q = DNS(id=300, qr=0, rd=1, qd=[DNSQR(qname=longest)])
    r = DNS(id=300, qr=1, ra=1, qd=[DNSQR(qname=longest)], an=[DNSRR(rrname=longest, ttl=600, rdata="203.0.113.90")])
    frames += [(T, bytes(eth / IP(src=CLIENT, dst=build.RESOLVER) / UDP(sport=42000, dport=53) / q)),
               (T + 0.01, bytes(eth / IP(src=build.RESOLVER, dst=CLIENT) / UDP(sport=53, dport=42000) / r)),
               (T + 0.02, bytes(eth / IP(src=CLIENT, dst="203.0.113.90") / TCP(sport=50200, dport=443, flags="S")))]
    raw = bytes(q)
    over = raw[:12] + b"\x3f" + b"a" * 63 + raw[12:]  # one more label: past 255 octets
    frames.append((T + 1, bytes(eth / IP(src=CLIENT, dst=build.RESOLVER) / UDP(sport=42001, dport=53) / over)))
    cap = read_capture(_capture(tmp_path, frames))
    assert {f.sport: f.hostname for f in cap.flows if f.src == CLIENT}[50200] == longest
    assert cap.stats.names["dns_queries"] == 1
