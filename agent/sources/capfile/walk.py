"""Record boundaries of pcap and pcapng files, read in large segments through a read() window.

Contract: `walk(win, stats, fmt, ...)` yields chunks of records as
`(window bytes, link type, data offsets, captured lengths, wire lengths, times, header windows)`;
for pcap with the C walk it yields the C walk's decoded groups in the last slot instead (a tuple;
see `reader.consume`). Truncation and corrupt records are noted in `stats`, never raised; only
a bad pcapng byte-order magic (not a capture we can read at all) raises UserError.

Why read() and not mmap: a mapped file that shrinks while it is read (logrotate's copytruncate in
a spool folder) kills the process with SIGBUS on the next page touched. With read() the walker just
meets the end of the file early, and reports the shrink as truncation.
"""

from __future__ import annotations

import array
import os
import struct
import sys

import numpy as np

from agent.errors import UserError
from agent.sources.capfile.columns import WINDOW, windows
from agent.sources.capfile.stats import MAX_BLOCK, MAX_RECORD, PCAP_MAGIC, CaptureStats, truncate

try:  # optional C walk of record boundaries (see _walk.c); the Python loop below is equivalent
    from agent.sources.capfile._walk import pcap_offsets as _c_offsets
    from agent.sources.capfile._walk import walk_pcap as _c_walk
except ImportError:  # pragma: no cover - depends on the build
    _c_walk = _c_offsets = None

CHUNK = 1 << 18  # records per vectorised batch: bounded memory, amortised numpy overhead
SEGMENT = 32 << 20  # bytes read at a time; larger than MAX_BLOCK, so any valid record fits a window
# Smallest valid pcapng block of each type (header, fixed fields, trailing length).
PCAPNG_MIN = {0x0A0D0D0A: 28, 1: 20, 2: 32, 3: 16, 6: 32}
_NATIVE = "<" if sys.byteorder == "little" else ">"
WALK = {"c": True}  # tests switch the C walk off to prove the Python walk equal


def c_walk_available() -> bool:
    """True when the C walk is built and switched on (the reader then walks pcap files in C)."""
    return _c_walk is not None and WALK["c"]


def walk(win: Window, stats: CaptureStats, fmt: str, progress=None, use_c: bool = True, payload=None):
    """The walker for `fmt` ("pcap" or "pcapng"). `use_c=False` asks for offsets only (a second
    pass: names, tunnels), which pcap still finds in C where built; pcapng is always walked here."""
    if fmt == "pcap":
        return walk_pcap(win, stats, progress, use_c=use_c, payload=payload)
    return walk_pcapng(win, stats, progress)


class Batch:
    """Record positions for one chunk: data offset, captured length, wire length, time, link type."""

    def __init__(self):
        self.off, self.cap, self.wire, self.ts, self.link = [], [], [], [], []


class Window:
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


def walk_pcap(win: Window, stats: CaptureStats, progress, use_c: bool = True, payload=None):
    win.advance(0)
    endian, unit = PCAP_MAGIC[win.data[:4]]
    if len(win.data) < 24:
        truncate(stats, 0, "file ends inside the pcap header")
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
                *groups, counts, off, _stop, cands, tls, queries = _c_walk(mm, off, CHUNK, endian != _NATIVE,
                                                                           MAX_RECORD, linktype, unit, prior, kept)
                n = counts[0]
                if payload is not None and (cands or queries):
                    payload.feed(mm, linktype, cands, tls, queries)
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
        truncate(stats, base + off, "file ends inside a record header")
    elif rec(mm, off + 8)[0] > MAX_RECORD:
        truncate(stats, base + off, f"corrupt record header (captured length {rec(mm, off + 8)[0]})")
    else:
        truncate(stats, base + off, "file ends inside a packet record")


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


def walk_pcapng(win: Window, stats: CaptureStats, progress):
    win.advance(0)
    off = 0
    endian = "<"
    ifaces: list[tuple[int, float, int]] = []  # (linktype, seconds per unit, snaplen)
    batch = Batch()
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
                truncate(stats, at, f"corrupt block length {blen}")
                break
            fits = off + blen <= end
        if not fits:
            # The block runs past the window: hand over what is batched (its offsets are local to
            # this window), then read on from the block's start.
            yield from _flush(batch, mm)
            batch = Batch()
            if win.advance(off):
                off, mm, end = 0, win.data, len(win.data)
                continue
            if off < end:
                truncate(stats, win.base + off, "file ends inside a block header" if off + 12 > end
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
                truncate(stats, at, f"corrupt section header length {blen}")
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
            batch = Batch()
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


def _flush(b: Batch, mm):
    if not b.off:
        return
    link = np.asarray(b.link, dtype=np.int64)
    off, cap = np.asarray(b.off, dtype=np.int64), np.asarray(b.cap, dtype=np.int64)
    wire, ts = np.asarray(b.wire, dtype=np.int64), np.asarray(b.ts, dtype=np.float64)
    for lt in np.unique(link):
        m = link == lt
        yield mm, int(lt), off[m], cap[m], wire[m], ts[m], None

