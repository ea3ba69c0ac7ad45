"""The evidence log: one JSON line per violation or indeterminate verdict, written whole.

    evidence:
      path: /var/lib/egress-agent/evidence.jsonl
      max_bytes: 104857600   # rotate past this size: evidence.jsonl.1, .2, ...
      backups: 10
      fsync: false           # true: fsync after every line (power-loss safe, slower)

Why lines cannot tear: each record is one `os.write` on an O_APPEND descriptor; a process killed
with SIGKILL dies between system calls, so a line is in the file whole or not at all, and nothing
waits in a user-space buffer. A restart appends to the same file. The records are readable by
`egress-agent audit` (the JSON-lines source takes the flow under "flow").
"""

from __future__ import annotations

import json
import os
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


def record(judged, verdict, event: str, extra: dict | None = None) -> dict:
    """The evidence record for one verdict: everything an auditor needs, nothing to look up."""
    f, loc = judged.flow, judged.location
    rec = {
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "event": event,
        **verdict.to_json(),
        "flow": f.to_json(),
        "country": loc.country if loc.unknown_reason is None else None,
        "jurisdictions": list(judged.jurisdictions),
        "location": {k: v for k, v in loc.to_json().items() if k not in ("ip",)},
        "asn": loc.asn,
        "as_org": loc.as_org,
    }
    if extra:
        rec.update(extra)
    return rec


class EvidenceLog:
    def __init__(self, options: Options):
        self.options = options
        self._lock = threading.Lock()
        self._fd = None
        self._size = 0
        self._open()

    def _open(self):
        d = os.path.dirname(os.path.abspath(self.options.path))
        try:
            os.makedirs(d, exist_ok=True)
            self._fd = os.open(self.options.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise UserError(f"evidence.path: cannot open {self.options.path} ({e.strerror})") from None
        self._size = os.fstat(self._fd).st_size
        # A line cut by power loss (not by a kill) would leave no newline at the end: start clean.
        if self._size:
            with open(self.options.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
                    self._size += 1

    def _rotate(self):
        os.close(self._fd)
        p, n = self.options.path, self.options.backups
        for i in range(n - 1, 0, -1):
            if os.path.exists(f"{p}.{i}"):
                os.replace(f"{p}.{i}", f"{p}.{i + 1}")
        if n > 0:
            os.replace(p, f"{p}.1")
        else:
            os.unlink(p)
        self._open()

    def write(self, rec: dict):
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._size and self._size + len(line) > self.options.max_bytes:
                self._rotate()
            os.write(self._fd, line)  # one system call: the line is whole or absent
            self._size += len(line)
            if self.options.fsync:
                os.fsync(self._fd)

    def flush(self):
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
