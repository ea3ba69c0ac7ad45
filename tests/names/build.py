"""Packets that carry names, built for the tests: ClientHellos (scapy's TLS layer), DNS responses
(scapy's DNS layer), and QUIC client Initial packets sealed here with the real key schedule, the
inverse of `agent.names.quic` (independent code: it encrypts, the agent decrypts)."""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.all import DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, IPv6, load_layer

load_layer("tls")
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName, TLS_Ext_Unknown  # noqa: E402
from scapy.layers.tls.handshake import TLSClientHello  # noqa: E402

CLIENT, RESOLVER = "192.0.2.10", "192.0.2.53"
ETH = lambda: Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # fixed: no ARP look-up while building
SALTS = {1: "38762cf7f55934b34d179ae6a4c80cadccbb7f0a", 0x6B3343CF: "0dede3def700a6db819381be6e269dcbf9bd2ed9",
         0xFF00001D: "afbfec289993d24c9e9786f19c6111e04390a899", 0xFF00001B: "c3eef712c72ebb5a11a7d2432bb46365bef9f502"}


def client_hello(sni: str | None, ech: bool = False, pad: int = 0) -> bytes:
    """A ClientHello handshake message (no record header)."""
    ext = []
    if sni is not None:
        ext.append(TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]))
    if ech:
        ext.append(TLS_Ext_Unknown(type=0xFE0D, val=b"\x00" + bytes(40)))
    if pad:
        ext.append(TLS_Ext_Unknown(type=21, val=bytes(pad)))  # padding extension: makes a big hello
    return bytes(TLSClientHello(ciphers=[0x1301, 0x1302], ext=ext))


def records(hello: bytes, split: int | None = None) -> bytes:
    """The hello in one TLS handshake record, or two when `split` (bytes in the first record)."""
    parts = [hello] if split is None else [hello[:split], hello[split:]]
    return b"".join(b"\x16\x03\x01" + struct.pack(">H", len(p)) + p for p in parts)


def dns_response(qname: str, answers: list, client=CLIENT, resolver=RESOLVER, v6=False) -> bytes:
    """answers: [(owner, "A"|"AAAA"|"CNAME", ttl, rdata)] -> an Ethernet frame."""
    an = [DNSRR(rrname=owner, type=rtype, ttl=ttl, rdata=rdata) for owner, rtype, ttl, rdata in answers]
    dns = DNS(id=7, qr=1, aa=0, rd=1, ra=1, qd=[DNSQR(qname=qname)], an=an)
    ip = IPv6(src=resolver, dst=client) if v6 else IP(src=resolver, dst=client)
    return bytes(ETH() / ip / UDP(sport=53, dport=40000) / dns)


def dns_query(qname: str, client=CLIENT, resolver=RESOLVER, v6=False, qid: int = 7, sport: int = 40000) -> bytes:
    """The query `dns_response` answers (same id, name and ports): an answer is only believed after
    its query."""
    ip = IPv6(src=client, dst=resolver) if v6 else IP(src=client, dst=resolver)
    return bytes(ETH() / ip / UDP(sport=sport, dport=53) / DNS(id=qid, qr=0, rd=1, qd=[DNSQR(qname=qname)]))


def tcp(src, sport, dst, dport, seq, payload=b"", flags="PA") -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return bytes(ETH() / ip / TCP(sport=sport, dport=dport, seq=seq, flags=flags) / payload)


def udp(src, sport, dst, dport, payload) -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return bytes(ETH() / ip / UDP(sport=sport, dport=dport) / payload)


def _expand(secret, label, n):
    full = b"tls13 " + label
    info = struct.pack(">HB", n, len(full)) + full + b"\x00"
    okm, t, i = b"", b"", 1
    while len(okm) < n:
        t = hmac.new(secret, t + info + bytes([i]), hashlib.sha256).digest()
        okm, i = okm + t, i + 1
    return okm[:n]


def initial_keys(dcid: bytes, version: int = 1):
    prefix = b"quicv2 " if version == 0x6B3343CF else b"quic "
    secret = hmac.new(bytes.fromhex(SALTS[version]), dcid, hashlib.sha256).digest()
    client = _expand(secret, b"client in", 32)
    return tuple(_expand(client, prefix + what, n) for what, n in ((b"key", 16), (b"iv", 12), (b"hp", 16)))


def _vi(n: int) -> bytes:
    return bytes([n]) if n < 64 else struct.pack(">H", 0x4000 | n)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + struct.pack(">H", 0x4000 | offset) + struct.pack(">H", 0x4000 | len(data)) + data


def seal_initial(dcid: bytes, frames: bytes, version: int = 1, pn: int = 0, scid: bytes = b"\x01\x02\x03\x04",
                 size: int = 1200, keys_of: int | None = None) -> bytes:
    """One client Initial packet, padded (PADDING frames) so the datagram is `size` octets. `keys_of`:
    seal with that version's keys while the header says `version` (a greased version, sealed as v1)."""
    key, iv, hp = initial_keys(dcid, keys_of if keys_of is not None else version)
    ptype = 1 if version == 0x6B3343CF else 0
    pn_len = 2
    head = bytes([0xC0 | ptype << 4 | (pn_len - 1)]) + struct.pack(">I", version) + bytes([len(dcid)]) + dcid + \
        bytes([len(scid)]) + scid + b"\x00"  # no token
    overhead = len(head) + 2 + pn_len + 16
    plain = frames + bytes(max(0, size - overhead - len(frames)))
    length = pn_len + len(plain) + 16
    header = head + struct.pack(">H", 0x4000 | length) + pn.to_bytes(pn_len, "big")
    nonce = iv[:12 - 8] + (int.from_bytes(iv[4:], "big") ^ pn).to_bytes(8, "big")
    sealed = AESGCM(key).encrypt(nonce, plain, header)
    pn_off = len(header) - pn_len
    sample = sealed[4 - pn_len:4 - pn_len + 16]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    first = bytes([header[0] ^ (mask[0] & 0x0F)])
    pnb = bytes(a ^ b for a, b in zip(header[pn_off:], mask[1:1 + pn_len], strict=True))
    return first + header[1:pn_off] + pnb + sealed
