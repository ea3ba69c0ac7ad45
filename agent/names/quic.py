"""QUIC client Initial packets -> the ClientHello they carry (RFC 9000/9001, RFC 9369, drafts 23-34).

A client's Initial packets are encrypted with keys anyone can derive from the packet's destination
connection ID (RFC 9001 section 5.2): HKDF-Extract with the version's salt, HKDF-Expand-Label for
the client key, IV and header-protection key. Header protection is removed with AES-ECB over a
16-byte sample, the payload opened with AES-128-GCM (the `cryptography` package), and the CRYPTO
frames gathered by offset; a ClientHello may span several Initial packets, which `Assembler`
joins by (client, server, DCID).

Contract: `open_initials(datagram)` -> list of (dcid, frames plaintext) for each client Initial in
a UDP datagram that decrypts (coalesced packets are walked; other packet types are skipped).
Raises `Malformed` for a long header that cannot be read; a packet that does not decrypt with
client keys (a server's Initial, or garbage) is `Undecryptable`, which callers count apart. A
version we have no keys for (a reserved one sent to force version negotiation, 0x?a?a?a?a, RFC 9000
section 15, or any other) is tried as v1, as Wireshark does: it counts only when its AEAD tag
verifies under the v1 keys; otherwise `UnknownVersion`, counted apart too.
`crypto_frames(plain)` -> [(offset, data)].
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from functools import lru_cache

V1, V2 = 0x00000001, 0x6B3343CF
SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")  # RFC 9001; drafts 33-34 too
SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")  # RFC 9369
SALT_D29 = bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")  # drafts 29-32
SALT_D23 = bytes.fromhex("c3eef712c72ebb5a11a7d2432bb46365bef9f502")  # drafts 23-28
MVFST = {0xFACEB002: SALT_D23, 0xFACEB00E: SALT_D29}  # Facebook mvfst's draft-27/-29 versions


class Malformed(ValueError):
    """A long-header packet whose header cannot be read."""


class Undecryptable(ValueError):
    """A packet that does not open with client Initial keys (a server Initial, or not QUIC)."""


class UnknownVersion(ValueError):
    """An Initial of a version we have no keys for that does not open with QUIC v1's either."""


def version_params(version: int) -> tuple[bytes, bytes, int] | None:
    """(salt, label prefix, Initial packet type) for the versions we can open, else None."""
    if version == V1:
        return SALT_V1, b"quic ", 0
    if version == V2:
        return SALT_V2, b"quicv2 ", 1
    if version >> 8 == 0xFF0000:
        draft = version & 0xFF
        if 33 <= draft <= 34:
            return SALT_V1, b"quic ", 0
        if 29 <= draft <= 32:
            return SALT_D29, b"quic ", 0
        if 23 <= draft <= 28:
            return SALT_D23, b"quic ", 0
    if version in MVFST:
        return MVFST[version], b"quic ", 0
    return None


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([i]), "sha256")
        out += block
        i += 1
    return out[:length]


@lru_cache(maxsize=4096)
def client_keys(dcid: bytes, version: int):
    """(AESGCM, IV, header-protection cipher) of the client's Initial packets for this DCID."""
    # here, not at the top: ~13 ms of imports that every audit without a QUIC Initial would pay
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, prefix, _ = version_params(version)
    initial = hmac.digest(salt, dcid, hashlib.sha256)
    client = _expand_label(initial, b"client in", 32)
    key = _expand_label(client, prefix + b"key", 16)
    iv = _expand_label(client, prefix + b"iv", 12)
    hp = _expand_label(client, prefix + b"hp", 16)
    return AESGCM(key), iv, Cipher(algorithms.AES(hp), modes.ECB())


def _varint(b: bytes, off: int) -> tuple[int, int]:
    if off >= len(b):
        raise Malformed("variable-length integer cut off")
    size = 1 << (b[off] >> 6)
    if off + size > len(b):
        raise Malformed("variable-length integer cut off")
    v = b[off] & 0x3F
    for k in range(1, size):
        v = (v << 8) | b[off + k]
    return v, off + size


def open_initials(dgram: bytes) -> list[tuple[bytes, bytes]]:
    out, off, n = [], 0, len(dgram)
    while off < n:
        first = dgram[off]
        if not first & 0x80:
            break  # a short-header packet ends the datagram
        if off + 7 > n:
            raise Malformed("long header cut off")
        version = int.from_bytes(dgram[off + 1:off + 5], "big")
        if version == 0:
            break  # version negotiation
        params = version_params(version)
        fallback = params is None  # a reserved (0x?a?a?a?a, RFC 9000 15) or unknown version: try v1's keys
        if fallback:
            params = version_params(V1)
        p = off + 5
        dlen = dgram[p]
        if dlen > 20 or p + 1 + dlen >= n:
            raise Malformed(f"destination connection ID length {dlen}")
        dcid = bytes(dgram[p + 1:p + 1 + dlen])
        p += 1 + dlen
        slen = dgram[p]
        if slen > 20 or p + 1 + slen > n:
            raise Malformed(f"source connection ID length {slen}")
        p += 1 + slen
        ptype = (first >> 4) & 0x03
        if ptype == (3 if params[2] == 0 else 0):  # Retry: no length field, runs to the end
            break
        if fallback:
            # As Wireshark does: read it as a v1 Initial and open it with the v1 salt. Only a packet
            # whose AEAD tag verifies under those keys counts (then its sender did seal it so);
            # anything else is counted as an unknown version, never guessed at.
            if ptype != 0:
                raise UnknownVersion(f"version {version:#010x}: not an Initial in the v1 layout")
            try:
                tlen, p = _varint(dgram, p)
                p += tlen
                length, p = _varint(dgram, p)
                end = p + length
                if end > n:
                    raise Malformed("length past the datagram")
                out.append((dcid, _open(dgram, off, p, end, dcid, V1)))
            except (Malformed, Undecryptable) as e:
                raise UnknownVersion(f"version {version:#010x} does not open with the v1 Initial keys ({e})") \
                    from None
            break  # what follows would be of the same unknown version
        if ptype == params[2]:
            tlen, p = _varint(dgram, p)
            p += tlen
        length, p = _varint(dgram, p)
        end = p + length
        if end > n:
            raise Malformed(f"packet length {length} runs past the datagram")
        if ptype == params[2]:
            out.append((dcid, _open(dgram, off, p, end, dcid, version)))
        off = end
    return out


def _open(dgram: bytes, start: int, pn_off: int, end: int, dcid: bytes, version: int) -> bytes:
    if pn_off + 4 + 16 > end:
        raise Malformed("Initial packet too short to sample for header protection")
    aead, iv, hp = client_keys(dcid, version)
    enc = hp.encryptor()
    mask = enc.update(bytes(dgram[pn_off + 4:pn_off + 20])) + enc.finalize()
    first = dgram[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn = bytes(a ^ b for a, b in zip(dgram[pn_off:pn_off + pn_len], mask[1:1 + pn_len], strict=True))
    header = bytes([first]) + bytes(dgram[start + 1:pn_off]) + pn
    nonce = bytes(iv[:12 - pn_len]) + bytes(a ^ b for a, b in zip(iv[12 - pn_len:], pn, strict=True))
    from cryptography.exceptions import InvalidTag  # imported already by client_keys

    try:
        return aead.decrypt(nonce, bytes(dgram[pn_off + pn_len:end]), header)
    except InvalidTag:
        raise Undecryptable("does not open with client Initial keys") from None


def crypto_frames(plain: bytes) -> list[tuple[int, bytes]]:
    """CRYPTO frames of an Initial packet's payload; the frames allowed there are walked."""
    out, off, n = [], 0, len(plain)
    while off < n:
        if plain[off] == 0x00:  # PADDING: a client pads to 1,200 octets, so skip the run in C, not per byte
            off = n - len(plain[off:].lstrip(b"\x00"))
            continue
        ftype, off = _varint(plain, off)
        if ftype == 0x01:  # PING
            continue
        if ftype == 0x06:  # CRYPTO
            cofs, off = _varint(plain, off)
            clen, off = _varint(plain, off)
            if off + clen > n:
                raise Malformed("CRYPTO frame runs past the packet")
            out.append((cofs, plain[off:off + clen]))
            off += clen
        elif ftype in (0x02, 0x03):  # ACK (with ECN counts for 0x03)
            _, off = _varint(plain, off)
            _, off = _varint(plain, off)
            count, off = _varint(plain, off)
            _, off = _varint(plain, off)
            for _ in range(count):
                _, off = _varint(plain, off)
                _, off = _varint(plain, off)
            if ftype == 0x03:
                for _ in range(3):
                    _, off = _varint(plain, off)
        elif ftype == 0x1C:  # CONNECTION_CLOSE: the rest is not a hello
            break
        else:
            raise Malformed(f"frame type {ftype:#x} is not allowed in an Initial packet")
    return out


class Assembler:
    """CRYPTO stream pieces per key (client, server, DCID) until a whole ClientHello is there.

    Bounded: at most `size` streams in progress (the oldest is dropped and counted in `evicted`),
    and at most MAX_STREAM octets per stream.
    """

    MAX_STREAM = 1 << 16

    def __init__(self, size: int = 4096):
        self.size = size
        self.evicted = 0
        self._streams: OrderedDict[tuple, dict[int, bytes]] = OrderedDict()

    def add(self, key: tuple, frames: list[tuple[int, bytes]]) -> bytes | None:
        """The whole ClientHello message once its pieces are all in, else None."""
        parts = self._streams.get(key)
        if parts is None:
            parts = self._streams[key] = {}
            if len(self._streams) > self.size:
                self._streams.popitem(last=False)
                self.evicted += 1
        for ofs, data in frames:
            if ofs + len(data) <= self.MAX_STREAM:
                parts[ofs] = data
        buf, pos = bytearray(), 0
        for ofs in sorted(parts):
            data = parts[ofs]
            if ofs > pos:
                break
            if ofs + len(data) > pos:
                buf += data[pos - ofs:]
                pos = ofs + len(data)
        if len(buf) >= 4:
            need = 4 + int.from_bytes(buf[1:4], "big")
            if len(buf) >= need:
                del self._streams[key]
                return bytes(buf[:need])
            if need > self.MAX_STREAM:
                del self._streams[key]
                raise Malformed(f"ClientHello claims {need - 4} octets")
        return None

    def drop(self, key: tuple):
        self._streams.pop(key, None)
