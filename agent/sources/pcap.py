"""pcap and pcapng files -> aggregated Flows, fast, in bounded memory.

Why by hand: scapy dissects ~6 kpps and dpkt ~80 kpps here; an audit of a real capture needs
millions. The file is read in large segments (`_Window`); a short loop (C, or Python) only walks
record boundaries, then numpy gathers the handful of header fields for a whole chunk at once
(`_decode_chunk`). Packets whose shape the vectorised path does not cover (3+ VLAN tags, IPv6
extension headers, BSD loopback) go through the scalar reference decoder in `decode.py`, which
tests prove equal to scapy. Memory stays flat: one segment is held at a time.

Why read() and not mmap: a mapped file that shrinks while it is read (logrotate's copytruncate in
a spool folder) kills the process with SIGBUS on the next page touched. With read() the reader just
meets the end of the file early, and reports the shrink as truncation.

Contract: `read_capture(path)` -> `Capture` with `flows` (one per distinct (proto, src, sport,
dst, dport); bytes are IP-layer octets) and `stats` (format, link types, packets, malformed,
non-IP, truncated + offset, warnings). Format is detected by magic number, never by name.
Raises UserError for files that are not captures.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from agent.errors import UserError
from agent.fileio import open_regular
from agent.flow import Flow
from agent.flowtable import KEY_HASH, FlowTable, concat, group_words
from agent.sources import decode as dec

try:  # optional C walk of record boundaries (see _walk.c); the Python loop below is equivalent
    from agent.sources._walk import pcap_offsets as _c_offsets
    from agent.sources._walk import table_dump as _c_table_dump
    from agent.sources._walk import walk_pcap as _c_walk
except ImportError:  # pragma: no cover - depends on the build
    _c_walk = _c_offsets = _c_table_dump = None

CHUNK = 1 << 18  # records per vectorised batch: bounded memory, amortised numpy overhead
MAX_RECORD = 1 << 24  # a record header claiming more than 16 MiB is corruption, not a packet
MAX_BLOCK = MAX_RECORD + (1 << 16)  # a pcapng block: one packet plus its options
SEGMENT = 32 << 20  # bytes read at a time; larger than MAX_BLOCK, so any valid record fits a window
WARN_OFFSETS = 5  # first offsets kept per warning kind
# Smallest valid pcapng block of each type (header, fixed fields, trailing length).
PCAPNG_MIN = {0x0A0D0D0A: 28, 1: 20, 2: 32, 3: 16, 6: 32}
PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
              b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_NATIVE = "<" if sys.byteorder == "little" else ">"
WALK = {"c": True}  # tests switch the C walk off to prove the Python walk equal


@dataclass
class CaptureStats:
    path: str
    format: str
    link_types: set = field(default_factory=set)
    packets: int = 0
    ip_packets: int = 0
    malformed: int = 0
    non_ip: int = 0
    unsupported: int = 0
    bytes: int = 0
    truncated: bool = False
    truncated_offset: int | None = None
    warnings: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # kind -> [count, first offsets, message]
    names: dict = field(default_factory=dict)  # what the names pass read: DNS responses, hellos, malformed
    # packets that can carry a name, as the C walk counts them (None: not counted, so look)
    name_candidates: int | None = 0

    def note(self, kind: str, message: str, offset: int | None = None, count: int = 1):
        """Aggregate a warning by kind: one line per kind with its count and first offsets.

        `message` may hold `{n}` for the count. A hostile file with 300,000 bad blocks gives one
        line, not 300,000; the C and Python paths, which see different chunks, give the same line.
        """
        row = self.notes.get(kind)
        if row is None:
            row = self.notes[kind] = [0, [], message]
        row[0] += count
        if offset is not None and len(row[1]) < WARN_OFFSETS:
            row[1].append(offset)

    def finish(self):
        """Fold the aggregated notes into `warnings` (called once, when reading is done)."""
        for n, offsets, message in self.notes.values():
            text = message.format(n=f"{n:,}")
            if offsets:
                more = "" if n <= len(offsets) else ", ..."
                where = "byte offset" if n == 1 else "first at byte offsets"
                text += f" ({where} {', '.join(map(str, offsets))}{more})"
            self.warnings.append(f"{self.path}: {text}")
        self.notes.clear()

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format,
                "link_types": sorted(dec.LINK_NAMES.get(lt, f"dlt-{lt}") for lt in self.link_types),
                "packets": self.packets, "malformed": self.malformed, "non_ip": self.non_ip,
                "unsupported_link": self.unsupported, "truncated": self.truncated,
                "truncated_offset": self.truncated_offset, "names": self.names, "warnings": self.warnings}


def sniff_format(head: bytes) -> str | None:
    if head[:4] in PCAP_MAGIC:
        return "pcap"
    if head[:4] == PCAPNG_MAGIC:
        return "pcapng"
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    return None


class _Batch:
    """Record positions for one chunk: data offset, captured length, wire length, time, link type."""

    def __init__(self):
        self.off, self.cap, self.wire, self.ts, self.link = [], [], [], [], []


class _Window:
    """A read()-based window over a file: `data` holds file bytes from offset `base` on.

    `advance(k)` keeps `data[k:]` and appends the next SEGMENT bytes; it returns False at the end
    of the file (nothing new). Walkers use window-local offsets and add `base` for anything a
    person sees.
    """

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path
        self.base = 0
        self.data = b""
        self.eof = False

    def advance(self, keep_from: int) -> bool:
        if self.eof:
            return False
        parts, want = [], SEGMENT
        while want > 0:
            try:
                b = os.read(self.fd, want)
            except OSError as e:
                raise UserError(f"{self.path}: byte offset {self.base + len(self.data)}: read failed "
                                f"({e.strerror})") from None
            if not b:
                self.eof = True
                break
            parts.append(b)
            want -= len(b)
        rest = self.data[keep_from:]
        self.base += keep_from
        self.data = b"".join([rest, *parts]) if rest else b"".join(parts)
        return bool(parts)


def _walk_pcap(win: _Window, stats: CaptureStats, progress, use_c: bool = True, payload=None):
    win.advance(0)
    endian, unit = PCAP_MAGIC[win.data[:4]]
    if len(win.data) < 24:
        _truncate(stats, 0, "file ends inside the pcap header")
        return
    linktype = struct.unpack_from(endian + "I", win.data, 20)[0] & 0x0FFFFFFF  # upper bits: FCS info
    stats.link_types.add(linktype)
    rec = struct.Struct(endian + "I").unpack_from
    dt = np.dtype(endian + "u4")
    native = endian == _NATIVE
    off = 24
    while True:
        mm = win.data
        end = len(mm)
        off = yield from _walk_pcap_window(mm, win.base, off, end, endian, unit, linktype, native, rec, dt,
                                           progress, use_c, payload)
        # The window ends here: inside a record (read on), at a corrupt header, or at the end of the file.
        if off + 16 <= end and rec(mm, off + 8)[0] > MAX_RECORD:
            _truncate_cause(stats, mm, rec, off, end, win.base)
            return
        if win.advance(off):
            off = 0
            continue
        if off < end:
            _truncate_cause(stats, mm, rec, off, end, win.base)
        return


def _walk_pcap_window(mm, base, off, end, endian, unit, linktype, native, rec, dt, progress, use_c=True,
                      payload=None):
    """Walk whole records of one window; returns the local offset of the first one that does not fit."""
    buf = np.frombuffer(mm, dtype=np.uint8)
    # Native-order files: read captured lengths through four 4-byte-aligned memoryview casts, one
    # per alignment (records have odd lengths), which is ~2x cheaper per record than unpack_from.
    mv = memoryview(mm)
    views = [mv[k:k + (end - k) // 4 * 4].cast("I") for k in range(4)] if native and end >= 8 else None
    try:
        while off < end:
            if _c_walk is not None and WALK["c"] and use_c:
                prior = payload.tls.tobytes() if payload is not None else b""
                kept = payload.flow_table if payload is not None else None
                *groups, counts, off, _stop, cands, tls = _c_walk(mm, off, CHUNK, endian != _NATIVE, MAX_RECORD,
                                                                  linktype, unit, prior, kept)
                n = counts[0]
                if payload is not None and cands:
                    payload.feed(mm, linktype, cands, tls)
                if n:
                    yield mm, linktype, None, None, None, None, (groups, counts, off)
                    if progress:
                        progress(base + off)
                if n < CHUNK:
                    return off
                continue
            if _c_offsets is not None and WALK["c"]:  # a second pass (names, tunnels): boundaries from C
                offs, off, _stop = _c_offsets(mm, off, CHUNK, endian != _NATIVE, MAX_RECORD)
                n = len(offs) // 8
            else:
                offs, off, n = _py_walk(mm, views, rec, off, end)
            if n:
                o = np.frombuffer(offs, dtype=np.int64)
                # One copy per record: its 16-byte header and the first WINDOW bytes of the packet.
                win = windows(buf, o, 16 + WINDOW)
                fields = np.ascontiguousarray(win[:, :16]).view(dt)
                ts = fields[:, 0].astype(np.float64) + fields[:, 1].astype(np.float64) * unit
                caps, wires = fields[:, 2].astype(np.int64), fields[:, 3].astype(np.int64)
                yield mm, linktype, o + 16, caps, wires, ts, win[:, 16:]
                if progress:
                    progress(base + off)
            if n < CHUNK:
                return off
        return off
    finally:
        if views is not None:
            for v in views:
                v.release()
        mv.release()


def _truncate_cause(stats, mm, rec, off: int, end: int, base: int = 0):
    if off + 16 > end:
        _truncate(stats, base + off, "file ends inside a record header")
    elif rec(mm, off + 8)[0] > MAX_RECORD:
        _truncate(stats, base + off, f"corrupt record header (captured length {rec(mm, off + 8)[0]})")
    else:
        _truncate(stats, base + off, "file ends inside a packet record")


def _py_walk(mm, views, rec, off: int, end: int):
    """Record offsets from `off`, at most CHUNK: (int64 array, next offset, count)."""
    offs = array.array("q")  # raw int64s: no per-record Python objects kept alive
    append = offs.append
    lim = end - 16
    n = 0
    # Hot loop: only record boundaries are walked in Python; numpy gathers fields later.
    if views is not None:
        while off <= lim and n < CHUNK:
            o = off + 8
            caplen = views[o & 3][o >> 2]
            if caplen > MAX_RECORD or off + 16 + caplen > end:
                break
            append(off)
            off += 16 + caplen
            n += 1
    else:
        while off <= lim and n < CHUNK:
            caplen = rec(mm, off + 8)[0]
            if caplen > MAX_RECORD or off + 16 + caplen > end:
                break
            append(off)
            off += 16 + caplen
            n += 1
    return offs, off, n


def windows(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(N, width) copy of buf[s:s+width] for each start, zero-padded past the end of the buffer.

    One row copy per packet through a strided view, instead of one fancy-index gather per field.
    Bytes past a record's captured length belong to the next record: callers mask by length.
    """
    n = len(buf)
    out = np.zeros((len(starts), width), dtype=np.uint8)
    safe = starts <= n - width
    if n >= width:
        sw = np.lib.stride_tricks.as_strided(buf, shape=(n - width + 1, width), strides=(1, 1), writeable=False)
        out[safe] = sw[starts[safe]]
    for i in np.flatnonzero(~safe).tolist():
        tail = buf[int(starts[i]):int(starts[i]) + width]
        out[i, :len(tail)] = tail
    return out


def _truncate(stats: CaptureStats, off: int, why: str):
    stats.truncated = True
    stats.truncated_offset = off
    stats.warnings.append(f"{stats.path}: truncated at byte offset {off}: {why}; "
                          "audited up to the last whole record")


def _walk_pcapng(win: _Window, stats: CaptureStats, progress):
    win.advance(0)
    off = 0
    endian = "<"
    ifaces: list[tuple[int, float, int]] = []  # (linktype, seconds per unit, snaplen)
    batch = _Batch()
    hdr_le, hdr_be = struct.Struct("<II").unpack_from, struct.Struct(">II").unpack_from
    hdr = hdr_le
    mm, end = win.data, len(win.data)
    while True:
        fits = off + 12 <= end
        if fits:
            at = win.base + off  # file offset, for anything a person sees
            btype, blen = hdr(mm, off)
            if btype == 0x0A0D0D0A:  # section header: byte order may change per section
                bom = mm[off + 8:off + 12]
                endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">" if bom == b"\x1a\x2b\x3c\x4d" else None
                if endian is None:
                    raise UserError(f"{stats.path}: byte offset {at}: bad pcapng byte-order magic")
                hdr = hdr_le if endian == "<" else hdr_be
                btype, blen = hdr(mm, off)
                ifaces = []
            if blen < 12 or blen % 4 or blen > MAX_BLOCK:
                _truncate(stats, at, f"corrupt block length {blen}")
                break
            fits = off + blen <= end
        if not fits:
            # The block runs past the window: hand over what is batched (its offsets are local to
            # this window), then read on from the block's start.
            yield from _flush(batch, mm)
            batch = _Batch()
            if win.advance(off):
                off, mm, end = 0, win.data, len(win.data)
                continue
            if off < end:
                _truncate(stats, win.base + off, "file ends inside a block header" if off + 12 > end
                          else "file ends inside a block")
            return
        if blen < PCAPNG_MIN.get(btype, 12):
            # Shorter than its own fixed fields: reading them would run into the next block.
            stats.note(f"short-{btype}", f"{{n}} block(s) of type {btype} shorter than their fixed fields "
                       f"({PCAPNG_MIN[btype]} bytes); skipped", at)
            if btype in (2, 3, 6):
                stats.malformed += 1
                stats.packets += 1
            elif btype == 0x0A0D0D0A:
                _truncate(stats, at, f"corrupt section header length {blen}")
                break
        elif btype == 6 or btype == 2:  # enhanced / obsolete packet block
            if btype == 6:
                iface, hi, lo, caplen, wire = struct.unpack_from(endian + "IIIII", mm, off + 8)
            else:
                iface, _drops, hi, lo, caplen, wire = struct.unpack_from(endian + "HHIIII", mm, off + 8)
            if iface >= len(ifaces) or caplen > blen - 32:
                stats.malformed += 1
                stats.packets += 1
                stats.note("bad-packet-block", "{n} packet block(s) name an interface not described before them "
                           "or overrun their block; skipped", at)
            else:
                lt, res, _snap = ifaces[iface]
                batch.off.append(off + 28)
                batch.cap.append(caplen)
                batch.wire.append(wire)
                batch.ts.append(((hi << 32) | lo) * res)
                batch.link.append(lt)
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if not ifaces:
                stats.malformed += 1
                stats.packets += 1
                stats.note("spb-no-iface", "{n} simple packet block(s) before any interface description; skipped",
                           at)
            else:
                wire = struct.unpack_from(endian + "I", mm, off + 8)[0]
                lt, _res, snap = ifaces[0]
                caplen = min(wire, snap or wire, blen - 16)
                batch.off.append(off + 12)
                batch.cap.append(caplen)
                batch.wire.append(wire)
                batch.ts.append(0.0)
                batch.link.append(lt)
        elif btype == 1:  # interface description
            lt, _res, snap = struct.unpack_from(endian + "HHI", mm, off + 8)
            ifaces.append((lt, _if_resolution(mm, off + 16, off + blen - 4, endian), snap))
            stats.link_types.add(lt)
        off += blen
        if len(batch.off) >= CHUNK:
            yield from _flush(batch, mm)
            batch = _Batch()
            if progress:
                progress(win.base + off)
    yield from _flush(batch, mm)


def _if_resolution(mm, off: int, end: int, endian: str) -> float:
    res = 1e-6
    while off + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", mm, off)
        if code == 0:
            break
        if code == 9 and length >= 1:  # if_tsresol
            v = mm[off + 4]
            res = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        off += 4 + ((length + 3) & ~3)
    return res


def _flush(b: _Batch, mm):
    if not b.off:
        return
    link = np.asarray(b.link, dtype=np.int64)
    off, cap = np.asarray(b.off, dtype=np.int64), np.asarray(b.cap, dtype=np.int64)
    wire, ts = np.asarray(b.wire, dtype=np.int64), np.asarray(b.ts, dtype=np.float64)
    for lt in np.unique(link):
        m = link == lt
        yield mm, int(lt), off[m], cap[m], wire[m], ts[m], None


WINDOW = 96  # link header + 2 VLAN tags + IPv4 with options or IPv6 + 4 bytes of ports
_K = KEY_HASH  # the flow key's hash multipliers (pcap_names picks rows by the same hash)


def _u16(a, b):
    return (a.astype(np.int64) << 8) | b


def _decode_chunk(buf: np.ndarray, linktype: int, off, cap, wire, w=None, l4_out: list | None = None):
    """Vectorised decode of one link type. Returns (status, fields, fallback mask).

    status: 0 ok, 1 non-ip, 2 malformed. `fields` = (good mask, key words (N, 5) uint64, IP length).
    Rows in `fallback` must be decoded by `decode.decode` (the reference decoder). `l4_out`, if
    given, receives each row's transport-header offset in the packet (meaningful for good rows).
    """
    n = len(off)
    status = np.zeros(n, dtype=np.int8)
    fallback = np.zeros(n, dtype=bool)
    if linktype not in (dec.ETHERNET, dec.SLL, dec.SLL2, dec.RAW, dec.RAW_12, dec.RAW_14, dec.IPV4, dec.IPV6):
        return status, None, np.ones(n, dtype=bool)  # NULL/LOOP and rarer: scalar path
    if w is None:
        w = windows(buf, off, WINDOW)
    rows = np.arange(n)

    def col(rel, k):
        """Byte at per-row offset rel + k of each window (clipped; callers mask by length)."""
        if isinstance(rel, int):
            return w[:, min(rel + k, WINDOW - 1)]
        return w[rows, np.minimum(rel + k, WINDOW - 1)]

    def col16(rel, k):
        return _u16(col(rel, k), col(rel, k + 1))

    if linktype == dec.ETHERNET:
        status[cap < 14] = 2
        et = _u16(w[:, 12], w[:, 13])
        l3 = 14
        tagged = np.isin(et, dec.VLAN_TPIDS)
        if tagged.any():  # up to two VLAN tags (802.1Q, QinQ) vectorised, more go to the scalar path
            l3 = np.full(n, 14, dtype=np.int64)
            for _ in range(2):
                tagged = np.isin(et, dec.VLAN_TPIDS) & (status == 0)
                status[tagged & (l3 + 4 > cap)] = 2
                et = np.where(tagged, col16(l3, 2), et)
                l3 = np.where(tagged, l3 + 4, l3)
            fallback |= np.isin(et, dec.VLAN_TPIDS) & (status == 0)
    elif linktype in (dec.SLL, dec.SLL2):
        l3 = 16 if linktype == dec.SLL else 20
        status[cap < l3] = 2
        et = _u16(w[:, 14], w[:, 15]) if linktype == dec.SLL else _u16(w[:, 0], w[:, 1])
    else:
        l3 = 0
        et = np.full(n, {dec.IPV4: dec.ET_IPV4, dec.IPV6: dec.ET_IPV6}.get(linktype, 0), dtype=np.int64)
    raw_ip = linktype in (dec.RAW, dec.RAW_12, dec.RAW_14)
    avail = cap - l3
    wire_avail = wire - l3
    b0 = col(l3, 0)
    ver = b0 >> 4
    ok = (status == 0) & ~fallback
    if not raw_ip:
        hint = np.where(et == dec.ET_IPV4, 4, np.where(et == dec.ET_IPV6, 6, 0))
        status[ok & (hint == 0)] = 1
        ok &= hint != 0
        status[ok & ((avail < 1) | (ver != hint))] = 2
    else:
        status[ok & ((avail < 1) | ((ver != 4) & (ver != 6)))] = 2
    ok &= status == 0
    v4 = ok & (ver == 4)
    v6 = ok & (ver == 6)
    ihl = (b0 & 0x0F).astype(np.int64) * 4
    tot4 = col16(l3, 2)
    plen6 = col16(l3, 4) + 40
    bad = (v4 & ((avail < 20) | (ihl < 20) | (tot4 < ihl) | (tot4 > wire_avail))) | \
          (v6 & ((avail < 40) | (plen6 > wire_avail)))
    status[bad] = 2
    v4 &= ~bad
    v6 &= ~bad
    proto = np.where(v4, col(l3, 9), col(l3, 6)).astype(np.int64)
    ext6 = v6 & (np.isin(proto, dec.IPV6_EXT) | (proto == dec.IPV6_FRAG))
    l4 = np.where(v4, l3 + ihl, l3 + 40)
    if l4_out is not None:
        l4_out.append(l4)
    deep = (v4 | v6) & (l4 + 4 > WINDOW)  # IPv4 options beyond the window: scalar path
    fallback |= ext6 | deep
    v6 &= ~(ext6 | deep)
    v4 &= ~deep
    frag4 = v4 & ((col16(l3, 6) & 0x1FFF) != 0)
    has_ports = (v4 | v6) & np.isin(proto, dec.PORT_PROTOS) & ~frag4
    short = has_ports & (l4 + 4 > cap)
    status[short] = 2
    has_ports &= ~short
    v4 &= ~short
    v6 &= ~short
    good = v4 | v6
    sport = np.where(has_ports, col16(l4, 0), 0)
    dport = np.where(has_ports, col16(l4, 2), 0)
    iplen = np.where(v4, tot4, plen6)
    words = np.zeros((n, 5), dtype=np.uint64)
    words[:, 0] = (np.where(v4, 4, 6).astype(np.uint64) << 40) | (proto.astype(np.uint64) << 32) | \
                  (sport.astype(np.uint64) << 16) | dport.astype(np.uint64)
    # Addresses as big-endian 64-bit words: IPv4 -> (0, addr), IPv6 -> (high, low).
    for rows_mask, first, width in ((v4, 12, 4), (v6, 8, 16)):
        if not rows_mask.any():
            continue
        idx = np.flatnonzero(rows_mask)
        base = (l3 if isinstance(l3, int) else l3[idx])
        for j, start in enumerate((first, first + width)):
            if isinstance(base, int):
                b = w[idx, base + start:base + start + width]
            else:
                b = w[idx[:, None], base[:, None] + start + np.arange(width)]
            b = np.ascontiguousarray(b)
            if width == 4:
                words[idx, 2 + 2 * j] = b.view(">u4").ravel().astype(np.uint64)
            else:
                pair = b.view(">u8").reshape(-1, 2)
                words[idx, 1 + 2 * j] = pair[:, 0]
                words[idx, 2 + 2 * j] = pair[:, 1]
    return status, (good, words, iplen), fallback


class _Flows:
    """Per-flow packets, bytes, first and last seen, keyed by five 64-bit words.

    Key words: (version<<40 | proto<<32 | sport<<16 | dport, src high, src low, dst high, dst low).
    Grouping hashes the words to one uint64 and verifies every row against its group's
    representative, so a hash collision can never merge two flows (it falls back to exact rows).
    """

    MERGE_ROWS = 1 << 21  # pending chunk groups merged (vectorised) past this many rows

    def __init__(self):
        self.by_key: dict[tuple, list] = {}  # the scalar path (add_one)
        self._pending: list[tuple] = []
        self._rows = 0

    @staticmethod
    def _group(words: np.ndarray):
        """(representative rows, inverse index) of identical key rows."""
        first, inv = group_words(words)
        return words[first], inv

    @classmethod
    def _reduce(cls, words, pk, by, first, last):
        reps, inv = cls._group(words)
        g = len(reps)
        out_pk = np.bincount(inv, weights=pk, minlength=g).astype(np.int64)
        out_by = np.bincount(inv, weights=by, minlength=g)
        out_first = np.full(g, np.inf)
        out_last = np.full(g, -np.inf)
        np.minimum.at(out_first, inv, first)
        np.maximum.at(out_last, inv, last)
        return reps, out_pk, out_by, out_first, out_last

    def add_keys(self, words: np.ndarray, iplen, ts):
        if len(words) == 0:
            return
        self.add_groups(*self._reduce(words, np.ones(len(words)), iplen.astype(np.float64), ts, ts))

    def add_groups(self, reps, pk, by, first, last):
        """Take per-chunk groups (key words and their packets, bytes, first and last seen); they
        are merged with numpy, in bulk, once enough have accumulated (and at the end)."""
        self._pending.append((reps, np.asarray(pk, dtype=np.float64), np.asarray(by, dtype=np.float64),
                              np.asarray(first, dtype=np.float64), np.asarray(last, dtype=np.float64)))
        self._rows += len(reps)
        if self._rows > self.MERGE_ROWS and len(self._pending) > 1:
            self._merge()

    def _merge(self):
        if len(self._pending) > 1:
            cols = list(zip(*self._pending, strict=True))
            merged = self._reduce(np.concatenate(cols[0]), *(np.concatenate(c) for c in cols[1:]))
            self._pending = [(merged[0], merged[1].astype(np.float64), *merged[2:])]
            self._rows = len(merged[0])

    def add_one(self, d: dec.Decoded, ts: float):
        s, t = int.from_bytes(d.src, "big"), int.from_bytes(d.dst, "big")
        key = ((d.version << 40) | (d.proto << 32) | (d.sport << 16) | d.dport,
               s >> 64, s & 0xFFFFFFFFFFFFFFFF, t >> 64, t & 0xFFFFFFFFFFFFFFFF)
        row = self.by_key.get(key)
        if row is None:
            self.by_key[key] = [1, d.iplen, ts, ts]
        else:
            row[0] += 1
            row[1] += d.iplen
            row[2] = min(row[2], ts)
            row[3] = max(row[3], ts)

    def flows(self, source: str) -> list[Flow]:
        return self.table(source).flows()

    def table(self, source: str) -> FlowTable:
        """The flows as columns, in the order of the merged groups."""
        if self.by_key:  # scalar-path flows join the bulk ones
            keys = np.array(list(self.by_key), dtype=np.uint64).reshape(-1, 5)
            vals = list(self.by_key.values())
            self.add_groups(keys, [v[0] for v in vals], [v[1] for v in vals], [v[2] for v in vals],
                            [v[3] for v in vals])
            self.by_key = {}
        self._merge()
        if not self._pending:
            z = np.zeros(0)
            return FlowTable(z, z, z, z, z, z, z, z, z, z, z, z, z, source)
        reps, pk, by, first, last = self._pending[0]
        w0 = reps[:, 0]
        v4 = (w0 >> np.uint64(40)) == 4
        return FlowTable((w0 >> np.uint64(32)) & np.uint64(0xFF), (w0 >> np.uint64(16)) & np.uint64(0xFFFF),
                         w0 & np.uint64(0xFFFF), v4, reps[:, 1], reps[:, 2], v4, reps[:, 3], reps[:, 4],
                         pk.astype(np.int64), by.astype(np.int64), first, last, source)


class Capture:
    """What a capture holds: its stats and its flows, as columns (`table`) or records (`flows`)."""

    def __init__(self, stats: CaptureStats, table: FlowTable):
        self.stats, self.table = stats, table
        self._flows: list[Flow] | None = None

    @property
    def flows(self) -> list[Flow]:
        if self._flows is None:
            self._flows = self.table.flows()
        return self._flows


def read_capture(path: str, progress=None, names: bool = True) -> Capture:
    fd, st = open_regular(path, "capture")
    try:
        if st.st_size == 0:
            raise UserError(f"{path}: empty file, not a capture")
        try:
            head = os.pread(fd, 64, 0)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        fmt = sniff_format(head)
        if fmt not in ("pcap", "pcapng"):
            raise UserError(f"{path}: not a pcap or pcapng file (first bytes {head[:8].hex()})")
        if fmt == "pcapng" and (len(head) < 12 or head[8:12] not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d")):
            raise UserError(f"{path}: byte offset 8: bad pcapng byte-order magic")
        stats = CaptureStats(path=path, format=fmt)
        win = _Window(fd, path)
        payload = None
        if fmt == "pcap" and _c_walk is not None and WALK["c"]:
            from agent.sources.pcap_payload import PayloadPass

            payload = PayloadPass(names)
        walker = _walk_pcap(win, stats, progress, payload=payload) if fmt == "pcap" else \
            _walk_pcapng(win, stats, progress)
        flows = _Flows()
        for mm, linktype, off, cap, wire, ts, w in walker:
            _consume(np.frombuffer(mm, dtype=np.uint8), mm, stats, flows, linktype, off, cap, wire, ts, w)
        read = win.base + len(win.data)
        if read < st.st_size:
            # The file shrank under us (copytruncate): what was read is audited, the rest is gone.
            stats.truncated = True
            stats.truncated_offset = read if stats.truncated_offset is None else stats.truncated_offset
            stats.warnings.append(f"{path}: the file shrank from {st.st_size:,} to {read:,} bytes while being read; "
                                  "audited what was read")
        if payload is not None:
            words, pk, by, first, last = _c_table_dump(payload.flow_table)
            if words:
                flows.add_groups(np.frombuffer(words, dtype=np.uint64).reshape(-1, 5),
                                 np.frombuffer(pk, dtype=np.int64), np.frombuffer(by, dtype=np.int64),
                                 np.frombuffer(first), np.frombuffer(last))
        outer = flows.table(fmt)
        if payload is not None and stats.name_candidates is not None:
            # the C walk handed over every packet the payload passes read: no second walk
            outer = concat([outer, *payload.tunnels(fmt, stats)])
            if names:
                from agent.sources.pcap_names import apply_names

                apply_names(payload.ex, stats, outer)
        else:
            if len(outer) and ((outer.proto == dec.GRE) | ((outer.proto == 17) & ((outer.sport == dec.GTPU_PORT) | (
                    outer.dport == dec.GTPU_PORT)))).any():
                outer = concat([outer, *_tunnel_pass(fd, fmt, stats)])
            if names:
                from agent.sources.pcap_names import name_flows

                name_flows(fd, fmt, stats, outer)
        stats.finish()
        return Capture(stats, outer)
    finally:
        os.close(fd)


def _tunnel_pass(fd: int, fmt: str, stats: CaptureStats) -> list[FlowTable]:
    """A second walk, only for captures with GRE or GTP-U flows: the flows their packets carry.

    Each tunnel's outer endpoint is already a flow; the inner destination is a transfer too (the
    data goes there). The pass uses the Python walk, so both walk paths give the same flows.
    """
    inner = {"gre": _Flows(), "gtp-u": _Flows()}
    scratch = CaptureStats(path=stats.path, format=fmt)
    os.lseek(fd, 0, os.SEEK_SET)  # the first walk read to the end
    win = _Window(fd, stats.path)
    walker = _walk_pcap(win, scratch, None, use_c=False) if fmt == "pcap" else _walk_pcapng(win, scratch, None)
    carried = 0
    for mm, linktype, off, cap, wire, ts, w in walker:
        if linktype not in dec.SUPPORTED_LINKS or off is None:
            continue
        status, fields, fallback = _decode_chunk(np.frombuffer(mm, dtype=np.uint8), linktype, off, cap, wire, w)
        rows = fallback.copy()
        if fields is not None:
            good, words, _ = fields
            k = words[:, 0]
            proto, sport, dport = (k >> np.uint64(32)) & np.uint64(0xFF), (k >> np.uint64(16)) & np.uint64(0xFFFF), \
                k & np.uint64(0xFFFF)
            gtpu = (proto == 17) & ((sport == dec.GTPU_PORT) | (dport == dec.GTPU_PORT))
            rows |= good & (status == 0) & ((proto == dec.GRE) | gtpu)
        for i in np.flatnonzero(rows).tolist():
            o, c = int(off[i]), int(cap[i])
            got = dec.tunnel_inner(linktype, bytes(mm[o:o + c]), int(wire[i]))
            if got is not None:
                inner[got[0]].add_one(got[1], float(ts[i]))
                carried += 1
    return tunnel_tables(inner, carried, fmt, stats)


def tunnel_tables(inner: dict, carried: int, fmt: str, stats: CaptureStats) -> list[FlowTable]:
    if carried:
        stats.note("tunnels", "{n} packet(s) in GRE or GTP-U tunnels: the flows they carry are judged too "
                              "(source " + fmt + ":gre / " + fmt + ":gtp-u)", count=carried)
    return [t.table(f"{fmt}:{kind}") for kind, t in inner.items()]


def _consume(buf, mm, stats, flows: _Flows, linktype, off, cap, wire, ts, win):
    if isinstance(win, tuple):  # walked, decoded and grouped by the C accelerator
        (words, pk, by, first, last), (records, ip_packets, ip_bytes, non_ip, malformed, unsupported, named), _ = win
        if stats.name_candidates is not None:
            stats.name_candidates += named
        stats.packets += records
        if words:  # nothing when the walk keeps its flow table across chunks (PayloadPass.flow_table)
            flows.add_groups(np.frombuffer(words, dtype=np.uint64).reshape(-1, 5), np.frombuffer(pk, dtype=np.int64),
                             np.frombuffer(by, dtype=np.int64), np.frombuffer(first), np.frombuffer(last))
        stats.ip_packets += ip_packets
        stats.bytes += ip_bytes
        stats.non_ip += non_ip
        stats.malformed += malformed
        if unsupported:
            stats.unsupported += unsupported
            stats.note(f"link-{linktype}", f"link type {linktype} is not supported; {{n}} packet(s) skipped",
                       count=unsupported)
        return
    n = len(off)
    stats.packets += n
    stats.name_candidates = None  # only the C walk counts them
    if linktype not in dec.SUPPORTED_LINKS:
        stats.unsupported += n
        stats.note(f"link-{linktype}", f"link type {linktype} is not supported; {{n}} packet(s) skipped", count=n)
        return
    status, fields, fallback = _decode_chunk(buf, linktype, off, cap, wire, win)
    if fields is not None:
        good, words, iplen = fields
        good = good & ~fallback & (status == 0)
        flows.add_keys(words[good], iplen[good], ts[good])
        stats.ip_packets += int(good.sum())
        stats.bytes += int(iplen[good].sum())
        stats.non_ip += int(((status == 1) & ~fallback).sum())
        stats.malformed += int(((status == 2) & ~fallback).sum())
    for i in np.flatnonzero(fallback).tolist():
        o, c = int(off[i]), int(cap[i])
        d = dec.decode(linktype, mm[o:o + c], int(wire[i]))
        if isinstance(d, dec.Decoded):
            flows.add_one(d, float(ts[i]))
            stats.ip_packets += 1
            stats.bytes += d.iplen
        elif d == "non-ip":
            stats.non_ip += 1
        else:
            stats.malformed += 1
