"""TLS ClientHello -> the server name the client asked for (SNI, RFC 6066 section 3).

Hand-decoded for the same reasons as `dns.py`: it reads the first bytes of every TLS connection
and must shrug off garbage. Tests prove it equal to scapy's TLS layer.

Contract:
- `client_hello_from_records(stream)`: `stream` is the start of the client's TCP byte stream.
  Returns `Hello` when the ClientHello is complete (it may span several TLS records), `NEED_MORE`
  when the bytes so far are a valid prefix, or raises `Malformed`. `NOT_TLS` when the stream does
  not start with a TLS handshake record (most TCP payloads: not an error).
- `parse_client_hello(msg)`: the same on a bare handshake message (QUIC's CRYPTO stream).
An ECH ClientHello (RFC 9849, extension 0xfe0d) is read as sent: its SNI is the outer, public name,
and `Hello.ech` says so. A server name that is an IP literal is not a name (`sni` is None then).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

_be16 = struct.Struct(">H").unpack_from
HANDSHAKE, CLIENT_HELLO = 22, 1
EXT_SERVER_NAME, EXT_ECH = 0x0000, 0xFE0D
MAX_HELLO = 1 << 16  # a ClientHello larger than this is not one we wait for (real ones: < 8 KiB)
NEED_MORE, NOT_TLS = "need-more", "not-tls"


class Malformed(ValueError):
    """Bytes that claim to be a ClientHello and are not a valid one; the text says where."""


class Hello(NamedTuple):
    sni: str | None
    ech: bool


def _is_ip_literal(name: str) -> bool:
    if not (name[-1:].isdigit() or ":" in name or name.endswith("]")):
        return False  # a name ending in letters is never an address: skip the parse
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def client_hello_from_records(stream: bytes) -> Hello | str:
    if len(stream) < 6:
        return NEED_MORE if _prefix_ok(stream) else NOT_TLS
    if not _prefix_ok(stream) or stream[5] != CLIENT_HELLO:
        return NOT_TLS
    body, off, need = bytearray(), 0, None
    while True:
        if len(stream) < off + 5:
            return NEED_MORE
        if stream[off] != HANDSHAKE or stream[off + 1] != 3:
            raise Malformed(f"record at stream offset {off} is not a handshake record before the ClientHello ended")
        rlen = _be16(stream, off + 3)[0]
        if rlen == 0 or rlen > 16384 + 2048:
            raise Malformed(f"record at stream offset {off} has length {rlen}")
        if len(stream) < off + 5 + rlen:
            # only the body bytes present so far matter for "is it still a valid prefix"
            body += stream[off + 5:]
            if need is None and len(body) >= 4:
                need = 4 + int.from_bytes(body[1:4], "big")
            if need is not None and need > MAX_HELLO:
                raise Malformed(f"ClientHello claims {need} octets")
            return NEED_MORE
        body += stream[off + 5:off + 5 + rlen]
        off += 5 + rlen
        if need is None and len(body) >= 4:
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO:
                raise Malformed(f"ClientHello claims {need} octets")
        if need is not None and len(body) >= need:
            return parse_client_hello(bytes(body[:need]))


def _prefix_ok(b: bytes) -> bool:
    """The bytes could begin a TLS handshake record (type 22, version 3.x)."""
    return (len(b) < 1 or b[0] == HANDSHAKE) and (len(b) < 2 or b[1] == 3) and (len(b) < 3 or b[2] <= 4)


def parse_client_hello(msg: bytes) -> Hello:
    n = len(msg)
    if n < 4 or msg[0] != CLIENT_HELLO:
        raise Malformed("not a ClientHello handshake message")
    end = 4 + int.from_bytes(msg[1:4], "big")
    if end > n:
        raise Malformed(f"ClientHello of {end - 4} octets cut off at {n - 4}")
    off = 4 + 2 + 32  # legacy_version, random
    if end < off + 1:
        raise Malformed("ClientHello cut off before the session id")
    off += 1 + msg[off]  # legacy_session_id
    if end < off + 2:
        raise Malformed("ClientHello cut off before the cipher suites")
    off += 2 + _be16(msg, off)[0]
    if end < off + 1:
        raise Malformed("ClientHello cut off before the compression methods")
    off += 1 + msg[off]
    if off > end:
        raise Malformed("ClientHello fields run past its length")
    if off == end:
        return Hello(None, False)  # no extensions (TLS 1.0-style hello)
    if end < off + 2:
        raise Malformed("extensions length cut off")
    ext_end = off + 2 + _be16(msg, off)[0]
    if ext_end > end:
        raise Malformed("extensions run past the ClientHello")
    off += 2
    sni, ech = None, False
    while off + 4 <= ext_end:
        etype, elen = _be16(msg, off)[0], _be16(msg, off + 2)[0]
        body, off = off + 4, off + 4 + elen
        if off > ext_end:
            raise Malformed(f"extension {etype:#06x} runs past the extensions")
        if etype == EXT_ECH:
            ech = True
        elif etype == EXT_SERVER_NAME and elen:
            sni = _server_name(msg, body, off)
    if off != ext_end:
        raise Malformed("extensions end inside an extension header")
    if sni is not None and _is_ip_literal(sni):
        sni = None
    return Hello(sni, ech)


def _server_name(msg: bytes, off: int, end: int) -> str | None:
    if end < off + 2 or off + 2 + _be16(msg, off)[0] != end:
        raise Malformed("server_name list length does not match its extension")
    off += 2
    while off + 3 <= end:
        kind, size = msg[off], _be16(msg, off + 1)[0]
        if off + 3 + size > end:
            raise Malformed("server name runs past its list")
        if kind == 0:  # host_name
            raw = msg[off + 3:off + 3 + size]
            if not raw or any(b <= 0x20 or b >= 0x7F for b in raw):
                raise Malformed("host_name is empty or not printable ASCII")
            return raw.decode("ascii").rstrip(".").lower()
        off += 3 + size
    return None
