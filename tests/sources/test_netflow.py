"""NetFlow v5/v9 and IPFIX exports: a real exporter's datagrams (softflowd) against the audit of the
capture they describe, and hand-built datagrams for what exporters do at the edges (templates late,
withdrawn, re-used; sequence gaps; sampling; variable-length and enterprise fields; damage).
Documentation addresses only; softflowd sends to loopback.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.sources.netflow.decode import Collector
from tests.helpers import write_pcap

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
LOCAL = "10.20.0.5"


def _conversation(t0: float) -> list:
    """TCP and UDP both ways between a local host and documentation peers, with recent times (an
    exporter's clock must place them: softflowd stamps flows from the packets)."""
    frames, t = [], t0
    def add(pkt):
        nonlocal t
        t += 0.01
        frames.append((t, bytes(ETH / pkt)))
    for i, (peer, port) in enumerate((("203.0.113.9", 443), ("198.51.100.7", 443), ("203.0.113.140", 8443))):
        sp = 40000 + i
        add(IP(src=LOCAL, dst=peer) / TCP(sport=sp, dport=port, flags="S"))
        add(IP(src=peer, dst=LOCAL) / TCP(sport=port, dport=sp, flags="SA"))
        add(IP(src=LOCAL, dst=peer) / TCP(sport=sp, dport=port, flags="PA") / (b"q" * (100 + i)))
        add(IP(src=peer, dst=LOCAL) / TCP(sport=port, dport=sp, flags="PA") / (b"r" * 1000))
        add(IP(src=LOCAL, dst=peer) / TCP(sport=sp, dport=port, flags="FA"))
        add(IP(src=peer, dst=LOCAL) / TCP(sport=port, dport=sp, flags="FA"))
    add(IP(src=LOCAL, dst="203.0.113.10") / UDP(sport=50000, dport=53) / b"query")
    add(IP(src="203.0.113.10", dst=LOCAL) / UDP(sport=53, dport=50000) / b"answer")
    add(IP(src="198.51.100.130", dst=LOCAL) / TCP(sport=51000, dport=22, flags="S"))  # inbound
    add(IP(src=LOCAL, dst="198.51.100.130") / TCP(sport=22, dport=51000, flags="SA"))
    return frames


def _softflowd(pcap, version: int) -> list[bytes]:
    """softflowd's export of a capture, received on a loopback socket."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    r = subprocess.run(["softflowd", "-r", str(pcap), "-v", str(version), "-n", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = []
    rx.settimeout(1)
    try:
        while True:
            got.append(rx.recv(65535))
    except TimeoutError:
        pass
    rx.close()
    return got


def _flows_of(records):
    return sorted((r.proto, r.src, r.sport, r.dst, r.dport, r.packets, r.bytes) for r in records)


@pytest.mark.skipif(shutil.which("softflowd") is None, reason="softflowd is not installed (Debian: softflowd)")
@pytest.mark.parametrize("version", [5, 9, 10])
def test_softflowds_exports_decode_to_the_captures_one_way_flows(tmp_path, version):
    from agent.sources.capfile.reader import read_capture

    pcap = write_pcap(tmp_path / "c.pcap", _conversation(time.time() - 120))
    coll = Collector()
    records = []
    for d in _softflowd(pcap, version):
        records += coll.datagram(d, "127.0.0.1", time.time())
    assert records and not any(coll.counts.values()), coll.counts
    assert coll.lost == {}
    cap = read_capture(str(pcap), names=False)
    want = sorted((f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes) for f in cap.flows)
    assert _flows_of(records) == want
    firsts = {(f.src, f.sport): f.first_seen for f in cap.flows}
    assert all(abs(r.first - firsts[(r.src, r.sport)]) < 1.5 for r in records)
    assert {r.sampled for r in records} == {1}


@pytest.mark.skipif(shutil.which("softflowd") is None, reason="softflowd is not installed (Debian: softflowd)")
def test_audit_of_a_capture_of_exports_equals_the_audit_of_the_capture(cli, tmp_path, city_db):
    """`audit --export-ports`: the collector's dry run judges what the capture's own audit judges."""
    frames = _conversation(time.time() - 120)
    pcap = write_pcap(tmp_path / "c.pcap", frames)
    exports = [(time.time(), bytes(ETH / IP(src="192.0.2.254", dst="192.0.2.1") / UDP(sport=9995, dport=2055) / d))
               for d in _softflowd(pcap, 10)]
    exp = write_pcap(tmp_path / "exports.pcap", exports)
    pub = ("--public-net", "203.0.113.0/24", "--public-net", "198.51.100.0/24", "--geoip-db", city_db)
    direct = json.loads(cli("audit", "--format", "json", *pub, pcap).stdout)
    r = cli("audit", "--format", "json", "--export-ports", "2055,4739", *pub, exp)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    via = json.loads(r.stdout)
    assert via["inputs"][0]["format"] == "netflow-exports" and via["inputs"][0]["exporters"] == ["192.0.2.254"]
    for k in ("totals", "verdicts", "destinations_by_country", "inbound_by_country"):
        assert via[k] == direct[k], k
    key = lambda v: (v["policy"], v["src"], v["sport"], v["dst"], v["dst_port"])  # noqa: E731
    assert sorted(map(key, via["violations"])) == sorted(map(key, direct["violations"]))
    # the same openers; known by the port rule here (a flow record's flags are the OR of its
    # packets', so both sides of a handshake show SYN) and by the SYN in the capture
    assert {v["opened_by"] for v in via["violations"]} == {"port"}
    assert cli("audit", "--export-ports", "0", exp).returncode == 2


# ---- hand-built datagrams -------------------------------------------------------------------

def _v9(seq, flowsets, domain=7, uptime=100_000, secs=1_750_000_000):
    body = b"".join(flowsets)
    return struct.pack("!HHIIII", 9, len(flowsets), uptime, secs, seq, domain) + body


def _set(sid, payload):
    pad = -(4 + len(payload)) % 4
    return struct.pack("!HH", sid, 4 + len(payload) + pad) + payload + b"\0" * pad


V9_FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4), (22, 4), (21, 4)]


def _v9_template(tid=300, fields=V9_FIELDS):
    return _set(0, struct.pack("!HH", tid, len(fields)) + b"".join(struct.pack("!HH", *f) for f in fields))


def _v9_record(src="10.20.0.5", dst="203.0.113.9", sport=40000, dport=443, proto=6, pk=3, by=300, first=99_000,
               last=99_500):
    return (socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HHBIIII", sport, dport, proto, pk, by,
                                                                        first, last))


def test_v9_data_before_its_template_waits_for_it():
    c = Collector()
    assert c.datagram(_v9(1, [_set(300, _v9_record())]), "192.0.2.254", 0) == []
    got = c.datagram(_v9(2, [_v9_template()]), "192.0.2.254", 0)
    assert [(r.dst, r.packets, r.bytes) for r in got] == [("203.0.113.9", 3, 300)]
    assert got[0].first == pytest.approx(1_750_000_000 - 1.0) and got[0].sampled is None
    assert c.counts["sampling_unknown"] == 1 and c.lost == {}


def test_records_read_in_c_are_left_out_of_the_cyclic_collectors_walks():
    """Numbers, texts and None only: the C reader untracks its records as CPython would at its
    collector's first look, so the young collections of a busy collector skip them."""
    import gc

    from agent.sources.netflow import decode

    if decode._nfdata is None:
        pytest.skip("the C reader is not built")
    c = Collector()
    c.datagram(_v9(1, [_v9_template()]), "192.0.2.254", 0)
    got = c.datagram(_v9(2, [_set(300, _v9_record() + _v9_record(sport=40001))]), "192.0.2.254", 0)
    assert len(got) == 2 and not any(gc.is_tracked(r) for r in got)


def test_v9_sampling_options_scale_and_sequence_gaps_are_lost_records():
    c = Collector()
    opt_tmpl = _set(1, struct.pack("!HHH", 400, 4, 8) + struct.pack("!HH", 1, 4) + struct.pack("!HHHH", 34, 4, 35, 1))
    opt_data = _set(400, struct.pack("!IIB", 0, 100, 2))
    c.datagram(_v9(10, [_v9_template(), opt_tmpl, opt_data]), "192.0.2.254", 0)
    got = c.datagram(_v9(11, [_set(300, _v9_record() + _v9_record(sport=40001))]), "192.0.2.254", 0)
    assert [(r.packets, r.bytes, r.sampled) for r in got] == [(300, 30000, 100)] * 2
    c.datagram(_v9(15, [_set(300, _v9_record())]), "192.0.2.254", 0)  # packets 12-14 never came
    assert c.lost == {"192.0.2.254": 3}
    other = c.datagram(_v9(11, [_set(300, _v9_record())]), "192.0.2.253", 0)  # another exporter: no template
    assert other == [] and c.lost == {"192.0.2.254": 3}


def _ipfix(seq, sets, domain=1, t=1_750_000_000):
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), t, seq, domain) + body


def _ipfix_template(tid=256, extra=()):
    fields = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 8), (1, 8), (152, 8), (153, 8), *extra]
    spec = b""
    for f in fields:
        spec += struct.pack("!HH", f[0], f[1]) + (struct.pack("!I", f[2]) if len(f) > 2 else b"")
    return _set(2, struct.pack("!HH", tid, len(fields)) + spec)


def _ipfix_record(dst="203.0.113.9", pk=2, by=120, start_ms=1_749_999_999_000, extra=b""):
    return (socket.inet_aton("10.20.0.5") + socket.inet_aton(dst) + struct.pack("!HHBQQQQ", 40000, 443, 6, pk, by,
                                                                                 start_ms, start_ms + 500) + extra)


def test_ipfix_variable_and_enterprise_fields_are_skipped_and_withdrawal_forgets():
    c = Collector()
    extra = ((0x8000 | 5, 65535, 29305), (82, 65535))  # an enterprise field and interfaceName, both variable
    tmpl = _ipfix_template(extra=extra)
    rec = _ipfix_record(extra=b"\x03abc" + b"\xff\x00\x04eth0")
    got = c.datagram(_ipfix(0, [tmpl, _set(256, rec + rec)]), "192.0.2.254", 0)  # records 0 and 1
    assert [(r.dst, r.packets, r.first) for r in got] == [("203.0.113.9", 2, 1_749_999_999.0)] * 2
    withdraw = _set(2, struct.pack("!HH", 256, 0))
    assert c.datagram(_ipfix(2, [withdraw, _set(256, rec)]), "192.0.2.254", 0) == []  # waits again
    got = c.datagram(_ipfix(3, [tmpl]), "192.0.2.254", 0)  # the template again: the waiting set decodes
    assert len(got) == 1 and c.lost == {}  # (a count that cannot be known is not called a loss)
    c.datagram(_ipfix(3, [_set(256, rec)]), "192.0.2.254", 0)  # record 3 (a template-only datagram has none)
    c.datagram(_ipfix(7, [_set(256, rec)]), "192.0.2.254", 0)  # 4, 5, 6 never came
    assert c.lost == {"192.0.2.254": 3}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([5, 9, 10]))
def test_hostile_datagrams_never_raise_and_are_counted(junk, version):
    c = Collector()
    c.datagram(_v9(1, [_v9_template()]), "192.0.2.254", 0)
    c.datagram(_ipfix(0, [_ipfix_template()]), "192.0.2.254", 0)
    data = struct.pack("!H", version) + junk
    got = c.datagram(data, "192.0.2.254", 0)
    assert isinstance(got, list)
    for r in got:
        assert 0 <= r.proto < 256 and 0 <= r.sport < 65536 and r.packets >= 0


def test_an_ipfix_exporters_numbering_convention_is_learnt_not_taken_for_loss():
    """softflowd numbers a message by the flow records up to and including it (RFC 7011: those sent
    before it); either way a gap after the first two messages is a loss."""
    tmpl, rec = _ipfix_template(), _ipfix_record()
    sizes = (2, 3, 1, 2)  # records per message: unequal, so the two conventions differ
    for seqs in ((0, 2, 5, 9), (2, 5, 6, 11)):  # RFC numbering, then softflowd's; 3 records lost before the last
        c = Collector()
        for i, (seq, n) in enumerate(zip(seqs, sizes, strict=True)):
            c.datagram(_ipfix(seq, ([tmpl] if i == 0 else []) + [_set(256, rec * n)]), "192.0.2.254", 0)
        assert c.lost == {"192.0.2.254": 3}, seqs


def test_a_capture_of_exports_cut_inside_a_record_keeps_what_came_before(cli, tmp_path):
    tmpl, rec = _ipfix_template(), _ipfix_record()
    frames = [(1_750_000_000.0 + i, bytes(ETH / IP(src="192.0.2.254", dst="192.0.2.1") / UDP(sport=9995, dport=4739)
                                          / _ipfix(i * 2, ([tmpl] if i == 0 else []) + [_set(256, rec * 2)])))
              for i in range(3)]
    whole = write_pcap(tmp_path / "exports.pcap", frames)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-40])  # the last datagram's record ends early
    r = cli("audit", "--format", "json", "--export-ports", "4739", cut)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    got = json.loads(r.stdout)["inputs"][0]
    assert got["truncated"] and got["datagrams"] == 2 and got["records"] == 4
    assert "ends in the middle of a record" in r.stderr and "WARNING: Pcap" not in r.stderr
    r = cli("audit", "--format", "json", "--export-ports", "4739", whole)
    assert json.loads(r.stdout)["inputs"][0]["records"] == 6 and not json.loads(r.stdout)["inputs"][0]["truncated"]
    for bad in ("abc", "0", "70000", ""):
        r = cli("audit", "--export-ports", bad, whole)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "--export-ports" in r.stderr


def _biflow_template(tid=257):
    """IPFIX biflow (RFC 5103): forward fields, then reverse octets, packets and TCP flags (PEN 29305)."""
    fields = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (2, 8), (1, 8), (152, 8), (153, 8),
              (0x8000 | 1, 8, 29305), (0x8000 | 2, 8, 29305), (0x8000 | 6, 1, 29305)]
    spec = b"".join(struct.pack("!HH", f[0], f[1]) + (struct.pack("!I", f[2]) if len(f) > 2 else b"")
                    for f in fields)
    return _set(2, struct.pack("!HH", tid, len(fields)) + spec)


def _biflow(src, sport, dst, dport, pk, by, rpk, rby, start_ms=1_749_999_999_000):
    return (socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HHBBQQQQQQB", sport, dport, 6, 0x1A, pk, by,
                                                                        start_ms, start_ms + 500, rby, rpk, 0x12))


def test_ipfix_biflows_carry_both_directions():
    """RFC 5103 reverse elements (enterprise 29305) make a record a biflow: what its destination sent
    back is on the record; a plain enterprise field is still skipped."""
    c = Collector()
    rec = _biflow("10.20.0.5", 40000, "203.0.113.9", 443, 4, 400, 6, 9000)
    (r,) = c.datagram(_ipfix(0, [_biflow_template(), _set(257, rec)]), "192.0.2.254", 0)
    assert (r.packets, r.bytes, r.packets_reply, r.bytes_reply, r.tcp_flags, r.tcp_flags_reply) == (
        4, 400, 6, 9000, 0x1A, 0x12)
    (one_way,) = c.datagram(_ipfix(1, [_ipfix_template(), _set(256, _ipfix_record())]), "192.0.2.254", 0)
    assert one_way.packets_reply is None and one_way.bytes_reply is None


def test_audit_of_biflow_exports_is_one_connection_each(cli, tmp_path, city_db):
    """A biflow exported from the responder's side is still opened by its source (the initiator):
    judged once, with both directions' counters."""
    recs = [_biflow("10.20.0.5", 40000, "203.0.113.9", 443, 4, 400, 6, 9000),
            _biflow("10.20.0.6", 40001, "198.51.100.7", 443, 2, 200, 2, 300)]
    d = _ipfix(0, [_biflow_template(), _set(257, b"".join(recs))])
    exp = write_pcap(tmp_path / "bi.pcap", [(time.time(), bytes(ETH / IP(src="192.0.2.254", dst="192.0.2.1") /
                                                                 UDP(sport=9995, dport=4739) / d))])
    r = cli("audit", "--format", "json", "--flows", "--export-ports", "4739", "--public-net", "203.0.113.0/24",
            "--public-net", "198.51.100.0/24", "--geoip-db", city_db, exp)
    rep = json.loads(r.stdout)
    assert rep["totals"]["egress_flows"] == 2 and rep["totals"]["flows"] == 2, r.stderr
    got = sorted((f["dst"], f["bytes_sent"], f["bytes_received"], f["opened_by"]) for f in rep["flows"])
    assert got == [("198.51.100.7", 200, 300, "first-packet"), ("203.0.113.9", 400, 9000, "first-packet")]


_FIELD_CHOICES = [(8, 4), (12, 4), (27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (6, 1), (6, 2), (2, 4), (2, 8),
                  (1, 8), (1, 3), (152, 8), (153, 8), (156, 8), (22, 4), (21, 4), (10, 2), (14, 4), (61, 1), (99, 5),
                  (0x8000 | 1, 8, 29305), (0x8000 | 7, 4, 9), (150, 4), (151, 4), (154, 8), (155, 8), (157, 8),
                  (153, 4), (160, 8), (85, 4), (86, 2), (23, 8), (24, 4), (0x8000 | 2, 4, 29305),
                  (0x8000 | 6, 1, 29305), (8, 3), (12, 16), (7, 9), (34, 4), (156, 6), (4, 2), (2, 1)]
_C_SHAPED = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (2, 4), (1, 8), (152, 8), (153, 8)]
_C_UPTIME6 = [(27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (6, 2), (2, 8), (1, 4), (22, 4), (21, 4), (10, 4),
              (14, 2), (61, 1), (0x8000 | 1, 8, 29305)]


@st.composite
def _template_and_body(draw):
    """Fields (random, or the shapes the C reader takes, shuffled) and a body of whole records and a tail."""
    fields = draw(st.lists(st.sampled_from(_FIELD_CHOICES), min_size=1, max_size=14)
                  | st.permutations(_C_SHAPED) | st.permutations(_C_UPTIME6))
    size = sum(f[1] for f in fields)
    n, tail = draw(st.integers(0, 6)), draw(st.integers(0, 8))
    rnd = draw(st.randoms(use_true_random=False))
    return fields, bytes(rnd.getrandbits(8) for _ in range(min(n * size + tail, 1200)))


@settings(max_examples=400, deadline=None)
@given(_template_and_body(), st.booleans(), st.sampled_from([None, 1, 7, 1 << 40]))
def test_template_structs_read_records_as_the_field_loop_does(fields_body, options, rate):
    """A fixed-length template read in C (`_nfdata`), with one struct, or field by field gives the
    same records, options and counts (sampled or not; with absolute, uptime or no times)."""
    fields, body = fields_body
    spec = b"".join(struct.pack("!HH", f[0], f[1]) + (struct.pack("!I", f[2]) if len(f) > 2 else b"")
                    for f in fields)
    if options:
        tmpl = _set(3, struct.pack("!HHH", 258, len(fields), 1) + spec)
    else:
        tmpl = _set(2, struct.pack("!HH", 258, len(fields)) + spec)
    data = _ipfix(0, [tmpl, _set(258, body)]) if len(body) < 60000 else None
    got = []
    for c_path, fast in ((True, True), (False, True), (False, False)):
        c = Collector()
        c.C, c.STRUCTS = c_path, fast
        for domain in (0, 1):  # v9's source id below, IPFIX's domain in _ipfix
            if rate is not None:
                c.sampling[("192.0.2.254", domain)] = rate
            c.init_ms[("192.0.2.254", domain)] = 1_749_000_000_123
        recs = c.datagram(data, "192.0.2.254", 1_750_000_000.0)
        recs += c.datagram(_ipfix(1, [_set(258, body)]), "192.0.2.254", 1_750_000_000.0)
        v9 = _v9_datagram(fields, body) if all(len(f) == 2 for f in fields) else None
        if v9 is not None:
            recs += c.datagram(v9, "192.0.2.254", 1_750_000_000.0)
        got.append(([(type(r), r) for r in recs], c.counts, c.sampling, c.init_ms, c.lost))
    assert got[0] == got[1] == got[2]


def _v9_datagram(fields, body) -> bytes | None:
    """A v9 export of one template and one data flowset (times relative to the header's uptime)."""
    spec = b"".join(struct.pack("!HH", *f) for f in fields)
    sets = struct.pack("!HHHH", 0, 8 + len(spec), 259, len(fields)) + spec
    if len(body) + 4 > 65000:
        return None
    sets += struct.pack("!HH", 259, 4 + len(body)) + body
    return struct.pack("!HHIIII", 9, 2, 4_000_000_000, 1_750_000_000, 0, 0) + sets


def test_the_c_data_set_reader_is_the_one_in_use():
    """Where the accelerator is built, a common IPFIX data set is read by it: the bench's shape."""
    from agent.sources.netflow import decode

    if decode._nfdata is None:
        pytest.skip("the C accelerator is not built here")
    fields = _C_SHAPED
    assert decode._plan(tuple((f, n, 0) for f, n in fields)) is not None
    rec = struct.pack("!4s4sHHBBIQQQ", socket.inet_aton("10.0.0.1"), socket.inet_aton("203.0.113.5"), 40000, 443, 6,
                      0x1B, 3, 999, 1_750_000_000_250, 1_750_000_001_500)
    spec = b"".join(struct.pack("!HH", *f) for f in fields)
    c = Collector()
    got = c.datagram(_ipfix(0, [_set(2, struct.pack("!HH", 256, len(fields)) + spec), _set(256, rec * 2)]),
                     "192.0.2.254", 1_750_000_002.0)
    assert c._plans and all(p is not None for p in c._plans.values())
    assert [(r.src, r.dst, r.sport, r.dport, r.proto, r.tcp_flags, r.packets, r.bytes, r.first, r.last, r.sampled)
            for r in got] == [("10.0.0.1", "203.0.113.5", 40000, 443, 6, 0x1B, 3, 999, 1_750_000_000.25,
                               1_750_000_001.5, None)] * 2
    assert c.counts["sampling_unknown"] == 2
