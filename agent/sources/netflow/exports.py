"""A capture of collector traffic (`tcpdump -w exports.pcap udp port 2055`) as the flows it exports:
`egress-agent audit --export-ports 2055,4739 exports.pcap`, the collector's dry run.

Contract: `read_exports(path, ports)` reads every UDP datagram to one of `ports` in a pcap or pcapng
file (scapy's raw readers: they take both, and no dissection is needed), hands its payload to one
`decode.Collector` keyed by the datagram's source address (the exporter), in capture order, and
returns (flows, stats): one-way `Flow`s (source `netflow:EXPORTER`, for the connection pairing the
other inputs go through) and the input's stats dict (datagrams, records, lost records per
exporter, what the decoder refused by kind, sampling). Fragmented datagrams (IPv4 offsets) cannot
be reassembled here and are counted. A file that is no capture is a UserError naming it; one cut
inside a record keeps what came before and says so (`truncated`, a warning), as the capture reader does.
"""

from __future__ import annotations

import logging
import socket

from agent.errors import UserError
from agent.flow import Flow
from agent.sources.netflow.decode import Collector
from agent.wire import decode as dec


def _udp_payload(linktype: int, data: bytes):
    """(source address text, destination port, payload) of a UDP datagram, else None ('fragment'
    for a non-first or incomplete fragment)."""
    start = dec.l3_start(linktype, data)
    if isinstance(start, str):
        return None
    off, _hint = start
    if len(data) <= off:
        return None
    ver = data[off] >> 4
    if ver == 4 and len(data) >= off + 20:
        ihl = (data[off] & 0x0F) * 4
        if data[off + 9] != 17:
            return None
        if int.from_bytes(data[off + 6:off + 8], "big") & 0x3FFF:
            return "fragment"
        src, l4 = socket.inet_ntop(socket.AF_INET, data[off + 12:off + 16]), off + ihl
        end = off + int.from_bytes(data[off + 2:off + 4], "big")
    elif ver == 6 and len(data) >= off + 40:
        if data[off + 6] != 17:
            return None  # extension headers before UDP: not an exporter's plain datagram
        src, l4 = socket.inet_ntop(socket.AF_INET6, data[off + 8:off + 24]), off + 40
        end = l4 + int.from_bytes(data[off + 4:off + 6], "big")
    else:
        return None
    if len(data) < l4 + 8 or end > len(data):
        return "fragment"  # cut by the snap length: the datagram is incomplete
    return src, int.from_bytes(data[l4 + 2:l4 + 4], "big"), bytes(data[l4 + 8:end])


class _Truncation(logging.Handler):
    """scapy's readers end a capture cut inside a record quietly (a log warning, then no more
    records): caught here, so the cut is reported with the input instead of passing for its end."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = 0

    def emit(self, record):
        if "truncated" in record.getMessage():
            self.seen += 1


def read_exports(path: str, ports: tuple[int, ...]) -> tuple[list[Flow], dict]:
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapReader

    coll = Collector()
    flows: list[Flow] = []
    datagrams = incomplete = 0
    scapy_log = logging.getLogger("scapy.runtime")
    cut = _Truncation()
    scapy_log.addHandler(cut)
    propagate, scapy_log.propagate = scapy_log.propagate, False  # said once, in our words, below
    try:
        try:
            reader = RawPcapReader(path)
        except (Scapy_Exception, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable pcap or pcapng capture of exports ({e})") from None
        datagrams, incomplete = _read(reader, path, ports, coll, flows)
    finally:
        scapy_log.removeHandler(cut)
        scapy_log.propagate = propagate
    return flows, _stats(path, ports, coll, flows, datagrams, incomplete, cut.seen > 0)


def _read(reader, path: str, ports: tuple[int, ...], coll: Collector, flows: list) -> tuple[int, int]:
    """(export datagrams decoded, datagrams that could not be) of one capture, in capture order."""
    from scapy.error import Scapy_Exception

    datagrams = incomplete = 0
    try:
        for data, meta in reader:
            linktype = getattr(meta, "linktype", None) or getattr(reader, "linktype", dec.ETHERNET)
            got = _udp_payload(linktype, data)
            if got is None:
                continue
            if got == "fragment":
                incomplete += 1
                continue
            exporter, dport, payload = got
            if dport not in ports:
                continue
            datagrams += 1
            ts = float(getattr(meta, "sec", 0)) + getattr(meta, "usec", 0) / 1e6 if hasattr(meta, "sec") else 0.0
            for r in coll.datagram(payload, exporter, ts):
                both = {} if r.packets_reply is None else {  # a biflow (RFC 5103): its source initiated it
                    "opened_by": "first-packet", "packets_reply": r.packets_reply, "bytes_reply": r.bytes_reply,
                    "tcp_flags": r.tcp_flags, "tcp_flags_reply": r.tcp_flags_reply}
                flows.append(Flow(r.proto, r.src, r.sport, r.dst, r.dport, r.packets, r.bytes, r.first, r.last,
                                  f"netflow:{r.exporter}", **both))
    except (Scapy_Exception, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: capture ends in the middle of a record ({e}); "
                        f"{datagrams:,} export datagram(s) read before it") from None
    finally:
        reader.close()
    return datagrams, incomplete


def _stats(path: str, ports, coll: Collector, flows: list, datagrams: int, incomplete: int, truncated: bool) -> dict:
    warnings = []
    if truncated:
        warnings.append(f"{path}: the capture ends in the middle of a record (cut short, or damaged after "
                        f"{datagrams:,} export datagram(s)): what follows was not read")
    if not datagrams:
        warnings.append(f"{path}: no UDP datagram to port(s) {', '.join(map(str, ports))}: is this a capture of "
                        "collector traffic, and are these the export ports?")
    lost = sum(coll.lost.values())
    if lost:
        warnings.append(f"{path}: exporters' sequence numbers say {lost:,} flow record(s) were lost before "
                        f"the capture: {', '.join(f'{e} {n:,}' for e, n in sorted(coll.lost.items()))}")
    if incomplete:
        warnings.append(f"{path}: {incomplete:,} export datagram(s) fragmented or cut by the snap length, "
                        "not decoded (capture with -s 0)")
    refused = {k: n for k, n in coll.counts.items() if n}
    if refused.get("sampling_unknown"):
        warnings.append(f"{path}: {refused['sampling_unknown']:,} record(s) from exporters that did not say "
                        "their sampling rate: counted as sent, not scaled")
    stats = {"path": path, "format": "netflow-exports", "ports": list(ports), "datagrams": datagrams,
             "records": len(flows), "exporters": sorted(coll.datagrams),
             "lost_records": dict(sorted(coll.lost.items())),
             "refused": refused, "incomplete_datagrams": incomplete, "truncated": truncated, "warnings": warnings}
    return stats
