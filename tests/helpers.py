"""Test fixtures built inside the tests: MaxMind-format databases and capture files.

No file here depends on ../shared. MMDBs come from mmdb-writer; captures are written with plain
struct so the reader under test is checked against an independent writer.
"""

from __future__ import annotations

import struct

from mmdb_writer import MMDBWriter
from netaddr import IPSet

# Documentation ranges mapped to countries, as the daemon and audit tests use them.
DOC_LOCATIONS = {
    "198.51.100.0/25": {"country": "DE", "asn": 24940, "org": "Hetzner Online GmbH"},
    "198.51.100.128/25": {"country": "JP"},
    "203.0.113.0/25": {"country": "US", "asn": 16509, "org": "AMAZON-02"},
    "203.0.113.128/26": {"country": "CN"},
    "203.0.113.192/27": {"registered": "FR"},  # registered country only
    "2001:db8:de::/48": {"country": "DE"},
    "2001:db8:5::/48": {"country": "US"},
}


def _country(cc, eu=None):
    d = {"iso_code": cc, "names": {"en": cc}}
    if eu is not None:
        d["is_in_european_union"] = eu
    return d


EU = {"DE", "FR", "NL", "IE"}


def build_city_mmdb(path, locations=None, database_type="GeoIP2-City"):
    """A City-layout MMDB (IPv6 tree, IPv4 mapped) from {cidr: {country, registered, continent, ...}}."""
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type,
                   languages=["en"], description="egress-agent test database")
    for cidr, spec in (locations or DOC_LOCATIONS).items():
        rec = {}
        if spec.get("country"):
            rec["country"] = _country(spec["country"], spec["country"] in EU)
            rec["registered_country"] = _country(spec.get("registered", spec["country"]))
        elif spec.get("registered"):
            rec["registered_country"] = _country(spec["registered"])
        if spec.get("continent") or spec.get("country"):
            rec["continent"] = {"code": spec.get("continent", "EU" if spec.get("country") in EU else "NA")}
        if spec.get("represented"):
            rec["represented_country"] = _country(spec["represented"])
        if spec.get("anycast"):
            rec["traits"] = {"is_anycast": True}
        w.insert_network(IPSet([cidr]), rec)
    w.to_db_file(str(path))
    return str(path)


def build_asn_mmdb(path, locations=None):
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
                   languages=["en"], description="egress-agent test ASN database")
    for cidr, spec in (locations or DOC_LOCATIONS).items():
        if spec.get("asn"):
            w.insert_network(IPSet([cidr]), {"autonomous_system_number": spec["asn"],
                                             "autonomous_system_organization": spec.get("org", "")})
    w.to_db_file(str(path))
    return str(path)


def write_pcap(path, frames, linktype=1, endian="<", nano=False, snaplen=262144):
    """frames: [(ts_float, bytes)] or [(ts_float, bytes, wirelen)]."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    with open(path, "wb") as f:
        f.write(struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        for fr in frames:
            ts, data = fr[0], fr[1]
            wire = fr[2] if len(fr) > 2 else len(data)
            sec = int(ts)
            frac = round((ts - sec) * (1e9 if nano else 1e6))
            f.write(struct.pack(endian + "IIII", sec, frac, len(data), wire) + data)
    return str(path)


def _opt(code, value: bytes, endian):
    pad = (-len(value)) % 4
    return struct.pack(endian + "HH", code, len(value)) + value + b"\x00" * pad


def _block(btype, body, endian):
    pad = (-len(body)) % 4
    body += b"\x00" * pad
    n = len(body) + 12
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def write_pcapng(path, interfaces, packets, endian="<", sections=1):
    """interfaces: [(linktype, tsresol_exponent or None)]; packets: [(iface, ts_float, bytes)].

    With sections=2 the packets are split over two sections (the second repeats the interfaces).
    """
    out = bytearray()
    per = [packets] if sections == 1 else [packets[: len(packets) // 2], packets[len(packets) // 2:]]
    for part in per:
        shb = struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
        out += _block(0x0A0D0D0A, shb, endian)
        for lt, res in interfaces:
            opts = b""
            if res is not None:
                opts += _opt(9, bytes([res]), endian) + struct.pack(endian + "HH", 0, 0)
            out += _block(1, struct.pack(endian + "HHI", lt, 0, 262144) + opts, endian)
        for iface, ts, data in part:
            res = interfaces[iface][1]
            units = int(round(ts * 10 ** (res if res is not None else 6)))
            body = struct.pack(endian + "IIIII", iface, units >> 32, units & 0xFFFFFFFF, len(data), len(data)) + data
            out += _block(6, body, endian)
    with open(path, "wb") as f:
        f.write(out)
    return str(path)
