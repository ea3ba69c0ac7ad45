"""Connections, not packet directions: each opener rule on a capture with its replies, read by the C
walk, the Python walk, pcapng and the scalar decoder, and flow logs paired the same way.

Packets are built with scapy (the reference dissector), with documentation addresses as peers.
"""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether

from agent.connections import connections
from agent.flow import Flow, flag_letters
from agent.flowtable import FlowTable
from agent.sources.capfile.reader import read_capture
from agent.wire import decode as dec
from tests.helpers import write_pcap, write_pcapng

S, SA, A, PA, FA, R = "S", "SA", "A", "PA", "FA", "R"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # fixed: scapy would look the gateway up


def _tcp(src, sport, dst, dport, flags, payload=b"", v6=False, ext=False):
    ip = (IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop()) if ext else IPv6(src=src, dst=dst) if v6 else \
        IP(src=src, dst=dst)
    return ETH / ip / TCP(sport=sport, dport=dport, flags=flags) / payload


def _udp(src, sport, dst, dport, payload=b"x"):
    return ETH / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload


def _icmp(src, dst, kind, code=0):
    return ETH / IP(src=src, dst=dst) / ICMP(type=kind, code=code)


def _quoting(src, dst, quoted):
    """An ICMP (ICMPv6) destination-unreachable from `src` to `dst` quoting the packet `quoted`."""
    if ":" in src:
        return ETH / IPv6(src=src, dst=dst) / ICMPv6DestUnreach(code=4) / quoted
    return ETH / IP(src=src, dst=dst) / ICMP(type=3, code=3) / quoted


L1, R1 = "10.86.1.5", "203.0.113.70"
# (name, packets in capture order, expected (src, sport, dst, dport, opened_by, sent, received))
SCENARIOS = [
    ("outbound handshake", [
        _tcp(L1, 40000, R1, 443, S), _tcp(R1, 443, L1, 40000, SA), _tcp(L1, 40000, R1, 443, A),
        _tcp(L1, 40000, R1, 443, PA, b"hello" * 20), _tcp(R1, 443, L1, 40000, PA, b"world" * 200),
        _tcp(L1, 40000, R1, 443, FA), _tcp(R1, 443, L1, 40000, FA)],
     (L1, 40000, R1, 443, "syn", 4, 3)),
    ("inbound ssh", [
        _tcp("203.0.113.71", 50022, "10.86.1.6", 22, S), _tcp("10.86.1.6", 22, "203.0.113.71", 50022, SA),
        _tcp("203.0.113.71", 50022, "10.86.1.6", 22, PA, b"SSH-2.0-x\r\n")],
     ("203.0.113.71", 50022, "10.86.1.6", 22, "syn", 2, 1)),
    ("syn-ack without its syn", [
        _tcp("203.0.113.72", 443, "10.86.1.7", 41000, SA), _tcp("10.86.1.7", 41000, "203.0.113.72", 443, A)],
     ("10.86.1.7", 41000, "203.0.113.72", 443, "syn-ack", 1, 1)),
    ("mid-connection, server answers first", [
        _tcp("203.0.113.73", 8443, "10.86.1.8", 42000, PA, b"data"), _tcp("10.86.1.8", 42000, "203.0.113.73", 8443, A)],
     ("10.86.1.8", 42000, "203.0.113.73", 8443, "port", 1, 1)),
    ("mid-connection inbound to a service port", [
        _tcp("10.86.1.9", 5432, "203.0.113.74", 52000, PA, b"row"), _tcp("203.0.113.74", 52000, "10.86.1.9", 5432, A)],
     ("203.0.113.74", 52000, "10.86.1.9", 5432, "port", 1, 1)),
    ("a DNS answer alone", [_udp("203.0.113.75", 53, "10.86.1.10", 43000)],
     ("10.86.1.10", 43000, "203.0.113.75", 53, "port", 0, 1)),
    ("udp, both ephemeral, local first", [
        _udp("10.86.1.11", 50000, "203.0.113.76", 40000), _udp("203.0.113.76", 40000, "10.86.1.11", 50000)],
     ("10.86.1.11", 50000, "203.0.113.76", 40000, "first-packet", 1, 1)),
    ("udp, both ephemeral, remote first", [
        _udp("203.0.113.77", 40001, "10.86.1.12", 50001), _udp("10.86.1.12", 50001, "203.0.113.77", 40001)],
     ("203.0.113.77", 40001, "10.86.1.12", 50001, "first-packet", 1, 1)),
    ("ping", [_icmp("10.86.1.13", "203.0.113.78", 8), _icmp("203.0.113.78", "10.86.1.13", 0)],
     ("10.86.1.13", 0, "203.0.113.78", 0, "icmp-echo", 1, 1)),
    ("an echo reply alone", [_icmp("203.0.113.79", "10.86.1.14", 0)],
     ("10.86.1.14", 0, "203.0.113.79", 0, "icmp-echo", 0, 1)),
    ("an icmp error alone", [_icmp("203.0.113.80", "10.86.1.15", 3, 1)],
     ("10.86.1.15", 0, "203.0.113.80", 0, "icmp-error", 0, 1)),
    ("a router's port unreachable belongs to the datagram it quotes", [
        _udp("10.86.1.16", 40100, "203.0.113.81", 33434),
        _quoting("203.0.113.200", "10.86.1.16", IP(src="10.86.1.16", dst="203.0.113.81") /
                 UDP(sport=40100, dport=33434) / b"x")],
     ("10.86.1.16", 40100, "203.0.113.81", 33434, "icmp-error", 1, 1)),
    ("an icmp error whose datagram the capture missed", [
        _quoting("203.0.113.201", "10.86.1.17", IP(src="10.86.1.17", dst="203.0.113.82") /
                 UDP(sport=40101, dport=33435) / b"x")],
     ("10.86.1.17", 40101, "203.0.113.82", 33435, "icmp-error", 0, 1)),
    ("icmpv6 unreachable quoting a syn", [
        _tcp("2001:db8::7", 40003, "2001:db8:1::11", 443, S, v6=True),
        _quoting("2001:db8:ff::1", "2001:db8::7", IPv6(src="2001:db8::7", dst="2001:db8:1::11") /
                 TCP(sport=40003, dport=443, flags=S))],
     ("2001:db8::7", 40003, "2001:db8:1::11", 443, "syn", 1, 1)),
    ("ipv6 handshake", [
        _tcp("2001:db8::5", 40001, "2001:db8:1::9", 443, S, v6=True),
        _tcp("2001:db8:1::9", 443, "2001:db8::5", 40001, SA, v6=True)],
     ("2001:db8::5", 40001, "2001:db8:1::9", 443, "syn", 1, 1)),
    ("ipv6 with an extension header (scalar decoder)", [
        _tcp("2001:db8:1::10", 443, "2001:db8::6", 40002, SA, ext=True),
        _tcp("2001:db8::6", 40002, "2001:db8:1::10", 443, A, ext=True)],
     ("2001:db8::6", 40002, "2001:db8:1::10", 443, "syn-ack", 1, 1)),
]


def _frames():
    """The scenarios' packets in order, 1 ms apart (tests/cases/connection-openers/openers.pcap)."""
    frames, t = [], 1_750_000_000.0
    for _name, pkts, _want in SCENARIOS:
        for p in pkts:
            t += 0.001
            frames.append((t, bytes(p)))
    return frames


def _expected():
    return sorted((want[0], want[1], want[2], want[3], want[4], want[5], want[6]) for _n, _p, want in SCENARIOS)


def _got(table: FlowTable):
    return sorted((f.src, f.sport, f.dst, f.dport, f.opened_by, f.packets, f.packets_reply)
                  for f in connections(table).flows())


def test_every_opener_rule_on_pcap(tmp_path, capture_walk):
    cap = read_capture(write_pcap(tmp_path / "c.pcap", _frames()), names=False)
    assert _got(cap.table) == _expected()


def test_every_opener_rule_on_pcapng(tmp_path):
    path = write_pcapng(tmp_path / "c.pcapng", [(1, 9)], [(0, t, d) for t, d in _frames()])
    assert _got(read_capture(path, names=False).table) == _expected()


def test_hints_of_each_walk_equal_the_scalar_decoder(tmp_path, capture_walk):
    """The C and numpy decoders give each one-way flow the OR of decode.hints over its packets."""
    want: dict = {}
    for _t, data in _frames():
        d = dec.decode(dec.ETHERNET, data)
        key = (d.proto, d.src, d.sport, d.dst, d.dport)
        want[key] = want.get(key, 0) | d.hints
    t = read_capture(write_pcap(tmp_path / "h.pcap", _frames()), names=False).table
    import ipaddress

    got = {}
    for i, f in enumerate(t.flows()):
        key = (f.proto, ipaddress.ip_address(f.src).packed.rjust(16, b"\0"), f.sport,
               ipaddress.ip_address(f.dst).packed.rjust(16, b"\0"), f.dport)
        got[key] = int(t.hints[i])
    assert got == want
    assert any(h & dec.HINT_SYN for h in want.values()) and any(h & dec.HINT_ECHO_REPLY for h in want.values())


def test_tcp_flags_of_both_directions():
    flows = {f.dport: f for f in connections(read_capture_table(SCENARIOS[0][1])).flows()}
    f = flows[443]
    assert flag_letters(f.tcp_flags) == "FSPA" and flag_letters(f.tcp_flags_reply) == "FSPA"
    j = f.to_json()
    assert j["opened_by"] == "syn" and j["packets_reply"] == 3 and j["tcp_flags"] == "FSPA"


def read_capture_table(pkts, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        frames = [(1_750_000_000 + i / 1000, bytes(p)) for i, p in enumerate(pkts)]
        return read_capture(write_pcap(Path(d) / "x.pcap", frames), names=False).table


def test_flow_log_lines_are_paired_like_packets():
    """Old one-way flow logs (no opened_by) pair the same way; a conntrack record is its original
    direction; a line that already is a connection stays as it is."""
    mk = lambda *a, **k: Flow(*a, **k)  # noqa: E731
    lines = [mk(6, L1, 40000, R1, 443, 4, 400, 1.0, 2.0, "jsonl"),
             mk(6, R1, 443, L1, 40000, 3, 3000, 1.1, 2.1, "jsonl"),
             mk(17, "203.0.113.75", 53, "10.86.1.10", 43000, 1, 80, 3.0, 3.0, "jsonl"),
             mk(6, "10.86.1.20", 443, R1, 50000, 9, 900, 4.0, 5.0, "conntrack"),  # as the kernel saw it
             mk(6, "10.86.1.21", 40001, R1, 443, 2, 200, 4.0, 5.0, "jsonl", opened_by="syn", packets_reply=5,
                bytes_reply=500)]
    got = sorted((f.src, f.sport, f.dst, f.dport, f.opened_by, f.packets, f.bytes, f.packets_reply, f.bytes_reply,
                  f.first_seen, f.last_seen) for f in connections(FlowTable.from_flows(lines)).flows())
    assert got == sorted([
        (L1, 40000, R1, 443, "port", 4, 400, 3, 3000, 1.0, 2.1),
        ("10.86.1.10", 43000, "203.0.113.75", 53, "port", 0, 0, 1, 80, 3.0, 3.0),
        ("10.86.1.20", 443, R1, 50000, "conntrack", 9, 900, 0, 0, 4.0, 5.0),
        ("10.86.1.21", 40001, R1, 443, "syn", 2, 200, 5, 500, 4.0, 5.0)])


def test_lines_of_one_busy_five_tuple_are_one_connection():
    """A 5-tuple on several lines (a log with a line per interval) is one connection while it is
    never idle for longer than its timeout; a line after a longer quiet starts another."""
    lines = [Flow(17, "10.86.1.30", 40000, R1, 53, 1, 70, float(t), float(t), "jsonl") for t in (10, 20, 200)] + \
        [Flow(17, R1, 53, "10.86.1.30", 40000, 1, 90, 10.5, 10.5, "jsonl")]
    got = sorted((f.first_seen, f.last_seen, f.src, f.dst, f.opened_by, f.packets, f.packets_reply)
                 for f in connections(FlowTable.from_flows(lines)).flows())
    assert got == [(10.0, 20.0, "10.86.1.30", R1, "port", 2, 1), (200.0, 200.0, "10.86.1.30", R1, "port", 1, 0)]


# A port reused after its idle timeout, on TCP (5 minutes) and UDP (1 minute), and stretches that
# stay one connection: each packet (seconds from the start, packet), in capture order.
L2, R2 = "10.86.1.40", "203.0.113.90"
IDLE = [
    (0, _tcp(L2, 40000, R2, 443, S)), (0.01, _tcp(R2, 443, L2, 40000, SA)), (0.02, _tcp(L2, 40000, R2, 443, FA)),
    (301, _tcp(L2, 40000, R2, 443, S)), (301.01, _tcp(R2, 443, L2, 40000, SA)),  # the same port, 5 min later
    # a long download: the server sends every 200 s for 10 minutes, the client is quiet
    (0, _tcp(L2, 40001, R2, 443, S)), (0.01, _tcp(R2, 443, L2, 40001, SA)), (200, _tcp(R2, 443, L2, 40001, PA, b"x")),
    (400, _tcp(R2, 443, L2, 40001, PA, b"x")), (600, _tcp(L2, 40001, R2, 443, A)),
    (0, _udp(L2, 40002, R2, 53)), (0.1, _udp(R2, 53, L2, 40002)), (61, _udp(L2, 40002, R2, 53)),
    # out of order: the packet at 30 s joins the one at 0 s, not the one at 100 s
    (0, _udp(L2, 40003, R2, 123)), (100, _udp(L2, 40003, R2, 123)), (30, _udp(L2, 40003, R2, 123)),
]
IDLE_WANT = sorted([
    (40000, 0.0, 0.02, "syn", 2, 1), (40000, 301.0, 301.01, "syn", 1, 1),
    (40001, 0.0, 600.0, "syn", 2, 3),
    (40002, 0.0, 0.1, "port", 1, 1), (40002, 61.0, 61.0, "port", 1, 0),
    (40003, 0.0, 30.0, "port", 2, 0), (40003, 100.0, 100.0, "port", 1, 0)])


def _idle_got(table: FlowTable, t0: float):
    return sorted((f.sport, round(f.first_seen - t0, 3), round(f.last_seen - t0, 3), f.opened_by, f.packets,
                   f.packets_reply) for f in connections(table).flows())


def test_idle_timeouts_on_every_walk(tmp_path, capture_walk):
    t0 = 1_750_000_000.0
    frames = [(t0 + dt, bytes(p)) for dt, p in IDLE]
    assert _idle_got(read_capture(write_pcap(tmp_path / "i.pcap", frames), names=False).table, t0) == IDLE_WANT
    pcapng = write_pcapng(tmp_path / "i.pcapng", [(1, 9)], [(0, t, d) for t, d in frames])
    assert _idle_got(read_capture(pcapng, names=False).table, t0) == IDLE_WANT


def test_idle_timeouts_across_chunks(tmp_path, capture_walk, monkeypatch):
    """Packets of one connection read in different chunks, and chunk groups merged before the end,
    are joined or cut exactly as when read at once."""
    from agent.sources.capfile import flows as flows_mod
    from agent.sources.capfile import walk as walk_mod

    monkeypatch.setattr(walk_mod, "CHUNK", 3)
    monkeypatch.setattr(flows_mod.FlowAccumulator, "MERGE_ROWS", 2)
    t0 = 1_750_000_000.0
    frames = [(t0 + dt, bytes(p)) for dt, p in IDLE]
    assert _idle_got(read_capture(write_pcap(tmp_path / "i.pcap", frames), names=False).table, t0) == IDLE_WANT


def test_idle_timeouts_of_the_scalar_decoder():
    """Packets the bulk decoders hand to the scalar one (IPv6 extension headers) are cut the same way."""
    from agent.sources.capfile.flows import FlowAccumulator

    acc = FlowAccumulator()
    for dt in (0, 30, 100, 250, 251):
        acc.add_one(dec.decode(dec.ETHERNET, bytes(_tcp("2001:db8::6", 40002, "2001:db8:1::10", 9999, A, ext=True))),
                    float(dt))
    acc.add_one(dec.decode(dec.ETHERNET, bytes(_udp(L2, 40004, R2, 5000))), 0.0)
    acc.add_one(dec.decode(dec.ETHERNET, bytes(_udp(L2, 40004, R2, 5000))), 61.0)
    got = sorted((f.proto, f.first_seen, f.last_seen, f.packets) for f in acc.table("pcap").flows())
    assert got == [(6, 0.0, 251.0, 5), (17, 0.0, 0.0, 1), (17, 61.0, 61.0, 1)]


def test_split_idle_equals_a_plain_reading():
    """split_idle against the definition, on random rows: sort a group's rows by first seen and cut
    where one starts more than the timeout after every earlier one has ended."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agent.flowtable import split_idle

    row = st.tuples(st.integers(0, 3), st.floats(0, 1000), st.floats(0, 200))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(row, min_size=1, max_size=40), st.sampled_from([10.0, 60.0, 300.0]))
    def check(rows, timeout):
        import numpy as np

        _, group = np.unique(np.array([r[0] for r in rows]), return_inverse=True)
        g = int(group.max()) + 1
        first = np.array([r[1] for r in rows])
        last = first + np.array([r[2] for r in rows])
        out, n = split_idle(group, g, first, last, np.full(len(rows), timeout), np.ones(g, dtype=bool))
        want = {}
        for grp in range(g):
            idx = sorted(np.flatnonzero(group == grp).tolist(), key=lambda i: (first[i], i))
            part, end = 0, -np.inf
            for i in idx:
                if first[i] > end + timeout and end != -np.inf:
                    part += 1
                want[i] = (grp, part)
                end = max(end, last[i])
        # same partition of the rows, numbered densely
        assert sorted(set(out.tolist())) == list(range(n))
        pairs = {(int(out[i]), want[i]) for i in range(len(rows))}
        assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)

    check()


def test_audit_judges_the_connection_once_and_never_a_reply(tmp_path, cli):
    """The issue's capture: one outbound HTTPS connection from a mainland host (GDPR and PIPL
    violations) and one inbound SSH connection (PIPL judges inbound: one verdict), nothing for
    replies; the per-country table counts egress connections and what the local side sent."""
    pkts = SCENARIOS[0][1] + [_tcp("203.0.113.71", 50022, "10.86.1.6", 22, S),
                              _tcp("10.86.1.6", 22, "203.0.113.71", 50022, SA),
                              _tcp("203.0.113.71", 50022, "10.86.1.6", 22, PA, b"SSH-2.0-x\r\n")]
    frames = [(1_750_000_000 + i / 1000, bytes(p)) for i, p in enumerate(pkts)]
    path = write_pcap(tmp_path / "issue.pcap", frames)
    from tests.helpers import build_city_mmdb

    db = build_city_mmdb(tmp_path / "g.mmdb", {"203.0.113.0/24": {"country": "US"}})
    r = cli("audit", "--format", "json", "--flows", "--public-net", "203.0.113.0/24", "--geoip-db", db, path)
    rep = json.loads(r.stdout)
    got = sorted((v["policy"], v["direction"], v["dst"], v["dst_port"], v["opened_by"]) for v in rep["violations"])
    assert got == [("gdpr-personal-data", "outbound", R1, 443, "syn"),
                   ("pipl-personal-information", "inbound", "10.86.1.6", 22, "syn"),
                   ("pipl-personal-information", "outbound", R1, 443, "syn")]
    assert rep["totals"]["egress_flows"] == 1 and rep["totals"]["inbound_flows"] == 1 and rep["totals"]["flows"] == 2
    (us,) = rep["destinations_by_country"]
    assert (us["country"], us["flows"], us["packets_sent"], us["packets_received"]) == ("US", 1, 4, 3)
    (inb,) = rep["inbound_by_country"]
    assert (inb["country"], inb["flows"], inb["packets_sent"], inb["packets_received"]) == ("US", 1, 1, 2)
    rows = {(f["src"], f["dst"]): f for f in rep["flows"]}
    assert rows[(L1, R1)]["direction"] == "outbound" and rows[(L1, R1)]["tcp_flags_reply"] == "FSPA"
    assert rows[("203.0.113.71", "10.86.1.6")]["direction"] == "inbound"


def test_connection_records_round_trip_through_both_flow_log_readers(tmp_path):
    """Connections written as JSON lines (`Flow.to_json`) read back equal by the line reader and
    the bulk reader, and are not paired again; a bad field is named by the line reader."""
    from agent.errors import UserError
    from agent.sources.flowlog.jsonl import read_jsonl
    from agent.sources.flowlog.table import read_jsonl_table

    conns = connections(read_capture_table([p for _n, pkts, _w in SCENARIOS for p in pkts])).flows()
    path = tmp_path / "conns.jsonl"
    path.write_text("".join(json.dumps(f.to_json()) + "\n" for f in conns))
    by_line, _ = read_jsonl(str(path))
    bulk, _ = read_jsonl_table(str(path))
    key = lambda f: (f.src, f.sport, f.dst, f.dport, f.proto)  # noqa: E731
    want = sorted((key(f), f.opened_by, f.packets, f.packets_reply, f.bytes_reply, f.tcp_flags, f.tcp_flags_reply)
                   for f in conns)
    for got in (by_line, bulk.flows(), connections(bulk).flows(), connections(FlowTable.from_flows(by_line)).flows()):
        assert sorted((key(f), f.opened_by, f.packets, f.packets_reply, f.bytes_reply, f.tcp_flags,
                       f.tcp_flags_reply) for f in got) == want
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"proto": "tcp", "src": "10.0.0.1", "sport": 1, "dst": "203.0.113.1", "dport": 443, '
                   '"opened_by": "guess"}\n')
    assert read_jsonl_table(str(bad)) is None
    with pytest.raises(UserError, match=r"bad.jsonl:1: opened_by: 'guess' is not one of syn, syn-ack"):
        read_jsonl(str(bad))
    bad.write_text('{"proto": "tcp", "src": "10.0.0.1", "sport": 1, "dst": "203.0.113.1", "dport": 443, '
                   '"bytes_reply": 5}\n')
    with pytest.raises(UserError, match="bytes_reply: given without opened_by"):
        read_jsonl(str(bad))


def test_the_golden_capture_is_these_scenarios(tmp_path):
    """tests/cases/connection-openers/openers.pcap is `_frames()` written out (regenerate with
    `python -c "from tests.test_connections import write_golden; write_golden()"`)."""
    want = write_pcap(tmp_path / "o.pcap", _frames())
    assert GOLDEN.read_bytes() == open(want, "rb").read()


GOLDEN = __import__("pathlib").Path(__file__).parent / "cases" / "connection-openers" / "openers.pcap"


def write_golden():
    write_pcap(GOLDEN, _frames())


def test_damaged_quotes_decode_the_same_on_every_walk(tmp_path):
    """An ICMP error's quote cut anywhere, or full of junk, gives the C walk, the numpy walk and
    the scalar decoder the same flows, and never breaks any of them."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agent.sources.capfile import walk as pcap_walk

    inner4 = bytes(IP(src="10.86.1.20", dst="203.0.113.90") / UDP(sport=40200, dport=33434) / b"x")
    inner6 = bytes(IPv6(src="2001:db8::20", dst="2001:db8:1::90") / TCP(sport=40201, dport=443, flags=S))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.integers(0, 60), st.binary(max_size=24))
    def check(v6, cut, junk):
        inner = (inner6 if v6 else inner4)[:cut] + junk
        outer = (ETH / IPv6(src="2001:db8:ff::1", dst="2001:db8::20") / ICMPv6DestUnreach(code=4) if v6 else
                 ETH / IP(src="203.0.113.200", dst="10.86.1.20") / ICMP(type=3, code=3))
        frames = [(1_750_000_000.0, bytes(outer / inner))]
        path = write_pcap(tmp_path / "q.pcap", frames)
        got = []
        c = pcap_walk._c_walk
        for use_c in ((True, False) if c is not None else (False,)):
            if not use_c:
                pcap_walk._c_walk = None
            try:
                got.append(sorted((f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes)
                                  for f in read_capture(path, names=False).flows))
            finally:
                pcap_walk._c_walk = c
        d = dec.decode(dec.ETHERNET, frames[0][1])
        assert all(g == got[0] for g in got), got
        assert len(got[0]) == (0 if isinstance(d, str) else 1)

    check()
