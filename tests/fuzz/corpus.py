"""Fuzz corpus: seed captures built with scapy, structure-aware mutations, and a scalar reference.

Seeds cover every link type and format the reader supports (pcap LE/BE, micro/nanoseconds; pcapng
with several sections and interfaces of different link types). Mutations know the structure: they
find record/block boundaries first and then lie in length fields, cut at or near a boundary,
renumber interfaces, change link types, or flip bytes inside a packet.

`reference_read` is a deliberately plain reader: a struct walk of records and the scalar decoder
(`decode.decode`, proven equal to scapy) for every packet. The differential tests require the C
walk, the Python walk + numpy decode, and this reference to agree on every case.
"""

from __future__ import annotations

import random
import struct

from agent.sources.capfile import walk as pcap_mod
from agent.wire import decode as dec
from tests.helpers import write_pcap, write_pcapng
from tests.sources.test_pcap import frames_for, ip_packets

LINKS = {"ethernet": 1, "vlan": 1, "qinq": 1, "vlan3": 1, "sll": 113, "sll2": 276, "raw": 101, "null": 0,
         "loop": 108}


def seeds(tmp) -> dict[str, bytes]:
    """name -> file bytes; built fresh by each run, never read from ../shared."""
    out = {}
    pkts = ip_packets(seed=7, n=40)
    for name, lt in LINKS.items():
        frames = frames_for(name, pkts)
        out[f"{name}.pcap"] = _bytes(write_pcap(tmp / f"{name}.pcap", [(1.0 + i, f) for i, f in enumerate(frames)],
                                                linktype=lt))
    v4 = [p for p in pkts if p.version == 4][:10]
    out["ipv4-only.pcap"] = _bytes(write_pcap(tmp / "v4.pcap", [(1.0, f) for f in frames_for("raw", v4)],
                                              linktype=228))
    out["be-nano.pcap"] = _bytes(write_pcap(tmp / "be.pcap", [(1.5, f) for f in frames_for("ethernet", pkts)],
                                            endian=">", nano=True))
    ifaces = [(1, None), (113, 9), (101, 6), (276, None)]
    names = ["ethernet", "sll", "raw", "sll2"]
    packets = [(i % 4, 1700000000 + i, frames_for(names[i % 4], [p])[0]) for i, p in enumerate(pkts)]
    for endian in "<>":
        out[f"multi{endian}.pcapng"] = _bytes(write_pcapng(tmp / f"m{ord(endian)}.pcapng", ifaces, packets,
                                                           endian=endian, sections=2))
    return out


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- structure --------------------------------------------------------------------------------
def records(data: bytes) -> tuple[str, str, list[int]]:
    """(format, endian, offsets of each record/block) of a well-formed seed."""
    if data[:4] in pcap_mod.PCAP_MAGIC:
        endian = pcap_mod.PCAP_MAGIC[data[:4]][0]
        offs, off = [], 24
        while off + 16 <= len(data):
            offs.append(off)
            off += 16 + struct.unpack_from(endian + "I", data, off + 8)[0]
        return "pcap", endian, offs
    offs, off, endian = [], 0, "<"
    while off + 12 <= len(data):
        if data[off:off + 4] == b"\x0a\x0d\x0d\x0a":
            endian = "<" if data[off + 8:off + 12] == b"\x4d\x3c\x2b\x1a" else ">"
        offs.append(off)
        off += struct.unpack_from(endian + "I", data, off + 4)[0]
    return "pcapng", endian, offs


LENGTHS = [0, 1, 3, 4, 8, 11, 12, 15, 16, 19, 20, 24, 27, 28, 31, 32, 0xFFFF, 1 << 24, (1 << 24) + 1, 0x7FFFFFFF,
           0xFFFFFFFF]


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One to three structure-aware mutations of a seed."""
    fmt, endian, offs = records(data)
    b = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        if not offs:
            break
        off = rnd.choice(offs)
        kind = rnd.randrange(8)
        if off + 16 > len(b):
            kind = 4
        if kind == 0:  # a length field lies: pcap caplen/wirelen, pcapng block length (either copy)
            field = (off + 8 if rnd.random() < 0.7 else off + 12) if fmt == "pcap" else \
                (off + 4 if rnd.random() < 0.7 else off + struct.unpack_from(endian + "I", b, off + 4)[0] - 4)
            if 0 <= field <= len(b) - 4:
                v = rnd.choice(LENGTHS) if rnd.random() < 0.6 else rnd.randrange(1 << 32)
                struct.pack_into(endian + "I", b, field, v)
        elif kind == 1 and fmt == "pcapng":  # EPB captured length or interface id
            if struct.unpack_from(endian + "I", b, off)[0] == 6 and off + 28 <= len(b):
                at = off + 20 if rnd.random() < 0.6 else off + 8
                struct.pack_into(endian + "I", b, at, rnd.choice(LENGTHS + [rnd.randrange(64)]))
        elif kind == 2:  # link type: pcap global header or an IDB
            if fmt == "pcap":
                struct.pack_into(endian + "I", b, 20, rnd.choice([0, 1, 12, 14, 101, 108, 113, 147, 228, 229, 276,
                                                                  0xFFFF, rnd.randrange(1 << 32)]))
            elif struct.unpack_from(endian + "I", b, off)[0] == 1:
                struct.pack_into(endian + "H", b, off + 8, rnd.choice([0, 1, 101, 113, 147, 228, 229, 276, 0xFFFF]))
        elif kind == 3:  # bytes inside a packet: IP version/IHL/length, ports
            at = off + rnd.randrange(16, 80)
            if at < len(b):
                b[at] = rnd.randrange(256)
        elif kind == 4:  # cut at or near a record boundary
            cut = max(0, off + rnd.randint(-20, 40))
            del b[cut:]
            offs = [o for o in offs if o < cut]
        elif kind == 5:  # a short block of each type at the end (pcapng) or a short record (pcap)
            if fmt == "pcapng":
                t = rnd.choice([1, 2, 3, 6, 0x0A0D0D0A])
                n = rnd.choice([12, 16, 20, 24, 28])
                b += struct.pack(endian + "II", t, n) + bytes(n - 12) + struct.pack(endian + "I", n)
            else:
                b += struct.pack(endian + "IIII", 1, 0, rnd.randint(0, 8), 60)
        elif kind == 6:  # an option with a lying length (pcapng IDB)
            if fmt == "pcapng" and struct.unpack_from(endian + "I", b, off)[0] == 1 and off + 20 <= len(b):
                struct.pack_into(endian + "HH", b, off + 16, 9, rnd.choice([0, 1, 0xFFFF]))
        else:  # duplicate a record in place
            end = offs[offs.index(off) + 1] if offs.index(off) + 1 < len(offs) else len(b)
            b[end:end] = b[off:end]
    return bytes(b)


# -- the plain reference ----------------------------------------------------------------------
def reference_read(path: str):
    """flows {(proto, src, sport, dst, dport): [packets, bytes]}, packets, malformed — or 'UserError'."""
    data = open(path, "rb").read()
    flows: dict = {}
    counts = {"packets": 0, "malformed": 0}

    def one(lt, pkt, wire):
        counts["packets"] += 1
        if lt not in dec.SUPPORTED_LINKS:
            return
        d = dec.decode(lt, pkt, wire)
        if isinstance(d, dec.Decoded):
            name = _names(d)
            row = flows.setdefault((d.proto, name[0], d.sport, name[1], d.dport), [0, 0, 0])
            row[0] += 1
            row[1] += d.iplen
            row[2] |= d.hints
        elif d == "malformed":
            counts["malformed"] += 1

    if len(data) == 0 or (data[:4] not in pcap_mod.PCAP_MAGIC and data[:4] != b"\x0a\x0d\x0d\x0a"):
        return "UserError"
    if data[:4] in pcap_mod.PCAP_MAGIC:
        endian = pcap_mod.PCAP_MAGIC[data[:4]][0]
        if len(data) < 24:
            return flows, 0, 0
        lt = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
        off = 24
        while off + 16 <= len(data):
            cap, wire = struct.unpack_from(endian + "II", data, off + 8)
            if cap > pcap_mod.MAX_RECORD or off + 16 + cap > len(data):
                break
            one(lt, data[off + 16:off + 16 + cap], wire)
            off += 16 + cap
        return flows, counts["packets"], counts["malformed"]
    if len(data) < 12 or data[8:12] not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
        return "UserError"
    off, endian, ifaces = 0, "<", []
    while off + 12 <= len(data):
        if data[off:off + 4] == b"\x0a\x0d\x0d\x0a":
            bom = data[off + 8:off + 12]
            if bom not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
                return "UserError"
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            ifaces = []
        btype, blen = struct.unpack_from(endian + "II", data, off)
        if blen < 12 or blen % 4 or blen > pcap_mod.MAX_BLOCK or off + blen > len(data):
            break
        if blen < pcap_mod.PCAPNG_MIN.get(btype, 12):
            if btype in (2, 3, 6):
                counts["packets"] += 1
                counts["malformed"] += 1
            elif btype == 0x0A0D0D0A:
                break
        elif btype in (2, 6):
            if btype == 6:
                iface, _hi, _lo, cap, wire = struct.unpack_from(endian + "IIIII", data, off + 8)
            else:
                iface, _d, _hi, _lo, cap, wire = struct.unpack_from(endian + "HHIIII", data, off + 8)
            if iface >= len(ifaces) or cap > blen - 32:
                counts["packets"] += 1
                counts["malformed"] += 1
            else:
                one(ifaces[iface][0], data[off + 28:off + 28 + cap], wire)
        elif btype == 3:
            if not ifaces:
                counts["packets"] += 1
                counts["malformed"] += 1
            else:
                wire = struct.unpack_from(endian + "I", data, off + 8)[0]
                lt, snap = ifaces[0]
                cap = min(wire, snap or wire, blen - 16)
                one(lt, data[off + 12:off + 12 + cap], wire)
        elif btype == 1:
            lt, _r, snap = struct.unpack_from(endian + "HHI", data, off + 8)
            ifaces.append((lt, snap))
        off += blen
    return flows, counts["packets"], counts["malformed"]


def _names(d: dec.Decoded):
    import ipaddress

    if d.version == 4:
        return str(ipaddress.IPv4Address(d.src[12:])), str(ipaddress.IPv4Address(d.dst[12:]))
    return str(ipaddress.IPv6Address(d.src)), str(ipaddress.IPv6Address(d.dst))
