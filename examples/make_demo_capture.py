"""Write examples/demo.pcap: a small Ethernet capture with egress the shipped policies judge.

Plain `struct`, no scapy, so the README's first command needs nothing beyond the package. The
addresses are real public ones (the demo runs on the embedded RIR data, which has no entries for
documentation ranges); nothing is sent anywhere: this only writes a file.

    python examples/make_demo_capture.py [OUT]
"""

import struct
import sys

T0 = 1764000000  # 2025-11-24

# (src, dst, proto, sport, dport, packets, payload bytes)
FLOWS = [
    ("10.0.0.5", "193.99.144.80", 6, 40001, 443, 6, 600),   # DE: inside the EU
    ("10.0.0.5", "8.8.8.8", 17, 40002, 53, 2, 40),          # US
    ("10.0.0.5", "1.0.16.1", 6, 40003, 443, 4, 900),        # JP: EU adequacy decision
    ("10.0.0.5", "114.114.114.114", 17, 40004, 53, 2, 40),  # CN
    ("10.0.0.5", "10.0.0.1", 17, 40005, 53, 2, 40),         # local, not egress
]


# (resolver, client, name, address, TTL): a DNS query and the answer the client received before
# connecting, so the audit and the inventory name the flow (`hostname_source: dns`); an answer
# without its query would be counted as unsolicited and name nothing
DNS_ANSWERS = [("10.0.0.1", "10.0.0.5", "www.heise.de", "193.99.144.80", 300)]


def dns_query(name: str) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def dns_answer(name: str, addr: str, ttl: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return (struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + qname + struct.pack("!HH", 1, 1)
            + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + ip4(addr))


def checksum(hdr: bytes) -> int:
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    return ~(s + (s >> 16)) & 0xFFFF


def ip4(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def frame(src, dst, proto, sport, dport, payload):
    data = payload if isinstance(payload, bytes) else b"\x00" * payload
    l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) if proto == 6 else \
        struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    body = l4 + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, proto, 0, ip4(src), ip4(dst))
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + hdr + body


def main(out="examples/demo.pcap"):
    with open(out, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for resolver, client, name, addr, ttl in DNS_ANSWERS:
            ask = frame(client, resolver, 17, 40100, 53, dns_query(name))
            f.write(struct.pack("<IIII", T0 - 1, 0, len(ask), len(ask)) + ask)
            pkt = frame(resolver, client, 17, 53, 40100, dns_answer(name, addr, ttl))
            f.write(struct.pack("<IIII", T0 - 1, 2000, len(pkt), len(pkt)) + pkt)
        t = T0
        for src, dst, proto, sport, dport, packets, payload in FLOWS:
            for i in range(packets):
                pkt = frame(src, dst, proto, sport, dport, payload)
                f.write(struct.pack("<IIII", t, i * 1000, len(pkt), len(pkt)) + pkt)
            t += 1
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
