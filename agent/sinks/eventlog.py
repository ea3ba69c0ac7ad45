"""The evidence log: one JSON line per violation or indeterminate verdict, written whole.

    evidence:
      path: /var/lib/egress-agent/evidence.jsonl
      max_bytes: 104857600   # rotate past this size: evidence.jsonl.1, .2, ...
      backups: 10
      fsync: false           # true: fsync after every line (power-loss safe, slower)

Why a torn line never reaches a reader: each record, or each batch of whole records
(`write_many`), is one `os.write` on an O_APPEND descriptor. Linux may still end a multi-page write
early when a fatal signal (SIGKILL) arrives, leaving the batch cut inside a record; so at start-up
the log cuts a tail that does not end in a newline back to the last whole record and says so in its
`gap` record (`torn`: the byte offset and length removed). `egress-agent audit` skips a torn line
inside a log (an older file, or a copy) with a warning, and reports every hole in `seq` that no
`gap` record explains. The daemon writes each batch of events it judged at once,
so records wait in memory only while their batch is judged (milliseconds). A restart appends to the
same file. The records are readable by
`egress-agent audit` (the JSON-lines source takes the flow under "flow", and reports `gap` records
as warnings). Every record has `seq`; the agent's own records are `gap` (evidence is missing
here: lost lines, or an unclean stop) and `stop` (a clean shutdown). See `EvidenceLog`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import UserError


@dataclass(frozen=True, slots=True)
class Options:
    path: str
    max_bytes: int = 100 << 20
    backups: int = 10
    fsync: bool = False


_PARTS: dict = {}  # the parts of records many flows share (see record); cleared when it grows
_PARTS_MAX = 4096


def _shared(judged, verdict) -> tuple[dict, dict]:
    """(the verdict's fields, where the destination is): the same for every flow with this verdict
    and this location apart from its address, so they are made once per such pair."""
    loc = judged.location
    vkey = ("v", id(verdict))  # by identity: verdicts are the verdict cache's, and hashing one hashes every field
    got = _PARTS.get(vkey)
    if got is None:
        got = _PARTS[vkey] = (verdict.to_json(), verdict)  # the verdict kept, so its id stays its own
    vpart = got[0]
    wkey = ("w", loc.scope, loc.lookup_ip, loc.country, loc.registered_country, loc.represented_country,
            loc.continent, loc.in_eu, loc.anycast, loc.asn, loc.as_org, loc.source, loc.provenance, loc.unknown_reason,
            judged.jurisdictions)
    where = _PARTS.get(wkey)
    if where is None:
        where = _PARTS[wkey] = {
            "country": loc.country if loc.unknown_reason is None else None,
            "jurisdictions": list(judged.jurisdictions),
            "location": {k: v for k, v in loc.to_json().items() if k not in ("ip",)},
            "asn": loc.asn,
            "as_org": loc.as_org,
        }
    if len(_PARTS) > _PARTS_MAX:
        _PARTS.clear()
    return vpart, where


def record(judged, verdict, event: str, extra: dict | None = None) -> dict:
    """The evidence record for one verdict: everything an auditor needs, nothing to look up. The
    definition of a record; the daemon writes `record_body`, held byte for byte equal to it.

    The verdict's fields and the location (without its address) are shared by many flows and made
    once (`_shared`); the message, the flow and the time are this flow's. Records are serialised
    soon after and never changed, so sharing the nested parts is safe."""
    vpart, where = _shared(judged, verdict)
    rec = {
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "event": event,
        "direction": "inbound" if getattr(judged, "inbound", False) else "outbound",  # who opened it
        **vpart,
        "message": judged.message(verdict),  # the cached verdict's text, naming this flow's destination
        "flow": judged.flow.to_json(),
        **where,
    }
    r = getattr(judged, "recipient", None)
    if r is not None:
        rec["recipient"] = {"id": r.id, "name": r.name, "role": r.role, "established_in": r.established_in,
                            "processing_locations": list(r.processing_locations)}
    if extra:
        rec.update(extra)
    return rec


_EVENTS: dict[tuple, bytes] = {}


def _shared_bytes(judged, verdict) -> tuple[bytes, bytes, bytes]:
    """`_shared`'s parts serialised: (the verdict's members up to `"message":`, its members after
    the message, the location's members), each made once per verdict or location class."""
    vkey = ("vb", id(verdict))
    got = _PARTS.get(vkey)
    vpart, where = _shared(judged, verdict)
    if got is None:
        keys = list(vpart)
        i = keys.index("message")
        head = _dumps({k: vpart[k] for k in keys[:i]})[1:-1]
        tail = _dumps({k: vpart[k] for k in keys[i + 1:]})[1:-1]
        got = _PARTS[vkey] = (head + b"," * bool(head) + b'"message":', b"," * bool(tail) + tail, verdict)
    wkey = ("wb", id(where))
    wb = _PARTS.get(wkey)
    if wb is None:
        wb = _PARTS[wkey] = (_dumps(where)[1:-1], where)
    return got[0], got[1], wb[0]


def record_body(judged, verdict, event: str, extra: bytes, flow: bytes, time: bytes) -> bytes:
    """`record` serialised, without its closing brace (the log adds `seq`): byte for byte
    `orjson.dumps(record(...))[:-1]` (tests hold them equal), from parts serialised once per verdict
    and location class. `extra` is `record`'s extra members serialised (b"" for none: see
    `extra_members`), `flow` the flow's JSON, `time` the time's JSON string."""
    head, tail, where = _shared_bytes(judged, verdict)
    inbound = bool(getattr(judged, "inbound", False))
    ev = _EVENTS.get((event, inbound))
    if ev is None:
        ev = _EVENTS[(event, inbound)] = (b',"event":' + _dumps(event) + b',"direction":'
                                          + (b'"inbound",' if inbound else b'"outbound",'))
    body = b"".join((b'{"time":', time, ev, head, _dumps(judged.message(verdict)), tail, b',"flow":', flow, b",",
                     where))
    r = getattr(judged, "recipient", None)
    if r is not None:
        body += b',"recipient":' + _dumps({"id": r.id, "name": r.name, "role": r.role,
                                             "established_in": r.established_in,
                                             "processing_locations": list(r.processing_locations)})
    return body + extra


def extra_members(extra: dict) -> bytes:
    """`record`'s extra members as `record_body` takes them."""
    return b"," + _dumps(extra)[1:-1] if extra else b""


def _whole_end(path: str, size: int) -> int:
    """The length of the file's whole lines: just past its last newline (0 if none)."""
    rd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(rd, end - start, start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                return start + at + 1
            end = start
        return 0
    finally:
        os.close(rd)


class EvidenceLog:
    """Append-only evidence file with rotation that cannot lose what is already written.

    Fault contract:
    * The file is opened with O_NOFOLLOW (a symlink planted at the path is refused, not followed)
      and created 0640. The descriptor is ours alone: after a failed rotation we keep writing to
      the old one (now `.1`, or still the current file) and retry; we never close a number we do
      not hold.
    * A line is written by one `write` or not at all. A short write (disk full) is cut back with
      `ftruncate` to the previous end, so no partial line is left for the next one to glue onto.
    * Lines that could not be written are counted (`lost_lines`); when writing works again the
      first thing written is a `gap` record saying how many and between which times.
    * Every record carries `seq`, increasing across restarts. A clean `close()` writes a `stop`
      record; at start-up a log whose last record is not `stop` gets a `gap` record
      (reason `unclean-stop`) naming the previous run's last sequence number and time, so an
      auditor sees the outage. A tail cut inside a record (a write ended early by SIGKILL) is
      truncated to the last whole record first, and the gap names it (`torn`).
    """

    RETRY_SECONDS = 5.0

    def __init__(self, options: Options, clock=None):
        import time as _time

        self.options = options
        self.clock = clock or _time.time
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self.seq = 0
        self.lost_lines = 0          # since the agent started
        self._unwritten = 0          # lost since the last successful write (for the gap record)
        self._lost_since: float | None = None
        self._last_error: str | None = None
        self._retry_at = 0.0
        self.gaps = 0
        self._torn: dict | None = None  # the torn tail cut at start-up: {"offset", "bytes"}
        d = os.path.dirname(os.path.abspath(options.path))
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise UserError(f"evidence.path: cannot create {d} ({e.strerror})") from None
        try:
            self._fd, self._size = self._open_path()
        except OSError as e:
            why = "is a symbolic link; refusing to follow it" if e.errno == errno.ELOOP else e.strerror
            raise UserError(f"evidence.path: cannot open {options.path} ({why})") from None
        last = self._last_record()
        self.seq = int(last.get("seq", 0)) if isinstance(last.get("seq"), int) else 0
        if (last and last.get("event") != "stop") or self._torn:
            gap = {"event": "gap", "reason": "unclean-stop", "previous_seq": last.get("seq"),
                   "from": last.get("time"), "until": _iso(self.clock()),
                   "message": "the previous run did not stop cleanly (killed, crashed or power lost): flows between "
                              "'from' and 'until' may have no evidence; flows still open were judged again at start"}
            if self._torn:
                gap["torn"] = self._torn
                gap["message"] += (f"; a record cut off at byte offset {self._torn['offset']} "
                                   f"({self._torn['bytes']} bytes) was removed")
            self._write_now(self._stamp(gap))
            self.gaps += 1

    # -- files --------------------------------------------------------------------------------
    def _open_path(self) -> tuple[int, int]:
        p = self.options.path
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{p} is not a regular file")
            size = st.st_size
            # A record cut by a kill inside a write, or by power loss, leaves no newline at the end:
            # cut the tail back to the last whole record, so no reader meets half a line.
            if size:
                whole = _whole_end(p, size)
                if whole < size:
                    os.ftruncate(fd, whole)
                    self._torn = {"offset": whole, "bytes": size - whole}
                    size = whole
        except OSError:
            os.close(fd)
            raise
        return fd, size

    def _last_record(self) -> dict:
        """The last whole record of the current file, or of `.1` when the current one is empty."""
        for path in (self.options.path, f"{self.options.path}.1"):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    end = f.tell()
                    f.seek(max(0, end - 65536))
                    lines = [x for x in f.read().splitlines() if x.strip()]
            except OSError:
                continue
            for raw in reversed(lines):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                return rec if isinstance(rec, dict) else {}
        return {}

    def _rotate(self):
        """Shift backups and start a new file. Any failure leaves the current descriptor in use
        (evidence keeps being written somewhere) and is retried after RETRY_SECONDS."""
        p, n = self.options.path, self.options.backups
        for i in range(n - 1, 0, -1):
            if os.path.lexists(f"{p}.{i}"):
                os.replace(f"{p}.{i}", f"{p}.{i + 1}")
        aside = f"{p}.1" if n > 0 else f"{p}.old"
        os.replace(p, aside)  # our fd now writes to `aside` until the new file is open
        new_fd, size = self._open_path()
        old, self._fd, self._size = self._fd, new_fd, size
        os.close(old)
        if n == 0:
            os.unlink(aside)  # no backups wanted

    # -- writing ------------------------------------------------------------------------------
    def _stamp(self, rec: dict) -> bytes:
        return self._line(self.body(rec))

    def body(self, rec: dict) -> bytes:
        """A record as `write_body` and `write_many` take it: serialised without its closing brace,
        its time first (now, when it has none)."""
        if "time" not in rec:
            rec = {"time": _iso(self.clock()), **rec}
        return _dumps(rec)[:-1]

    def _line(self, body: bytes) -> bytes:
        """The line of a record body: its sequence number last."""
        self.seq += 1
        return body + b',"seq":%d}\n' % self.seq

    def _write_now(self, line: bytes):
        """One write of a whole line; a short write is cut back. Raises OSError on failure."""
        try:
            n = os.write(self._fd, line)
        except OSError:
            self._cut_back()
            raise
        if n != len(line):
            self._cut_back()
            why = f"{os.strerror(errno.ENOSPC)} (short write: {n} of {len(line)} bytes, cut back)"
            raise OSError(errno.ENOSPC, why)
        self._size += n
        if self.options.fsync:
            os.fsync(self._fd)

    def _cut_back(self):
        try:
            if os.fstat(self._fd).st_size > self._size:
                os.ftruncate(self._fd, self._size)
        except OSError:
            pass

    def write(self, rec: dict):
        """Write one record. Raises OSError when it could not be written (it is counted as lost);
        the log keeps working and retries, and a gap record marks the loss once writes succeed."""
        self.write_body(self.body(rec))

    def write_body(self, body: bytes):
        """`write` for a record already serialised without its closing brace (see `record_body`)."""
        with self._lock:
            now = self.clock()
            line = self._line(body)
            if self._size and self._size + len(line) + 256 > self.options.max_bytes and now >= self._retry_at:
                try:
                    self._rotate()
                except OSError as e:
                    self._retry_at = now + self.RETRY_SECONDS
                    self._last_error = f"rotation failed ({e.strerror or e}); still writing to the old file"
            try:
                if self._unwritten:
                    self.seq -= 1  # the gap record takes the line's number; the line the next
                    gap = self._stamp({"event": "gap", "reason": "write-failed", "lost_lines": self._unwritten,
                                       "from": _iso(self._lost_since), "until": _iso(now),
                                       "error": self._last_error,
                                       "message": f"{self._unwritten} evidence record(s) could not be written"})
                    self._write_now(gap)
                    self._unwritten, self._lost_since = 0, None
                    self.gaps += 1
                    line = self._line(body)  # renumbered after the gap record
                self._write_now(line)
            except OSError as e:
                self.lost_lines += 1
                self._unwritten += 1
                self._lost_since = self._lost_since or now
                self._last_error = e.strerror or str(e)
                raise

    def write_many(self, bodies: list[bytes]) -> tuple[int, list[OSError]]:
        """Write record bodies (`record_body`) in order with one `write` where it can: (lines
        written, the error of each record lost). Whole lines only, as `write`. A batch that would
        cross the rotation size is written as the lines that fit (one write), the line that crosses
        (alone, through `write_body`, which rotates first), then the rest again so. A batch that
        fails, or follows lost lines (a gap record comes first), goes record by record through
        `write_body`, which cuts back, counts and retries as it does for one."""
        lost: list[OSError] = []
        i = 0
        while i < len(bodies):
            n = self._write_fitting(bodies, i)
            i += n
            if i == len(bodies):
                break
            try:  # the line that does not fit (or could not be written with the others): alone
                self.write_body(bodies[i])
            except OSError as e:
                lost.append(e)
            i += 1
            if n == 0 and (self._unwritten or self._size + len(bodies[i - 1]) + 256 > self.options.max_bytes):
                for b in bodies[i:]:  # still no room (a rotation that failed) or lines lost: one by one
                    try:
                        self.write_body(b)
                    except OSError as e:
                        lost.append(e)
                break
        return len(bodies) - len(lost), lost

    def _write_fitting(self, bodies: list[bytes], i: int) -> int:
        """Write bodies[i:] that fit before the rotation size in one write; how many (0: none
        fitted, lines were lost before, or the write failed and was cut back)."""
        with self._lock:
            if self._unwritten:
                return 0
            seq = self.seq
            data, fit = numbered_lines(bodies, i, seq, self.options.max_bytes - 256 - self._size)
            if not fit:
                return 0
            try:
                self._write_now(data)
            except OSError:
                return 0  # a short write was cut back: the caller writes the lines one by one
            self.seq = seq + fit
            return fit

    def flush(self):
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self):
        """Write the `stop` record (a clean stop) and close."""
        with self._lock:
            if self._fd is None:
                return
            try:
                self._write_now(self._stamp({"event": "stop", "lost_lines": self.lost_lines}))
                os.fsync(self._fd)
            except OSError:
                pass  # then the next start reports an unclean stop: true enough
            os.close(self._fd)
            self._fd = None


try:  # orjson: ~10x faster than json.dumps on these records; same JSON, UTF-8 instead of \u escapes
    import orjson

    def _dumps(rec: dict) -> bytes:
        return orjson.dumps(rec)
except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    def _dumps(rec: dict) -> bytes:
        return json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()


json_bytes = _dumps  # compact JSON as bytes, exactly as records are written


def py_numbered_lines(bodies: list[bytes], i: int, seq: int, room: int) -> tuple[bytes, int]:
    """The lines `_line` makes of bodies[i:], numbered from seq + 1, joined: as many as fit in
    `room` octets in all, and how many."""
    lines = [b'%b,"seq":%d}\n' % (b, n) for n, b in enumerate(bodies[i:], seq + 1)]
    fit = len(lines)
    if sum(map(len, lines)) > room:
        fit, used = 0, 0
        for line in lines:
            used += len(line)
            if used > room:
                break
            fit += 1
    return b"".join(lines[:fit]), fit


try:  # the same in C (agent/sinks/_evidence.c): the listing and join cost ~0.9 us a record
    from agent.sinks._evidence import lines as numbered_lines
except ImportError:  # not built: Python's, same bytes
    numbered_lines = py_numbered_lines


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
