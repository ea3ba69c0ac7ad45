"""What a person is told about a capture file (`CaptureStats`), its limits, and format sniffing.

Contract: `CaptureStats.note` aggregates warnings by kind (one line per kind with its count and first
byte offsets, so a hostile file with 300,000 bad blocks gives one line); `finish()` folds them into
`warnings` once reading is done. `sniff_format(head)` names a format by magic number, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.wire import decode as dec

MAX_RECORD = 1 << 24  # a record header claiming more than 16 MiB is corruption, not a packet
MAX_BLOCK = MAX_RECORD + (1 << 16)  # a pcapng block: one packet plus its options
WARN_OFFSETS = 5  # first offsets kept per warning kind
PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
              b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


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


def truncate(stats: CaptureStats, off: int, why: str):
    """Record that the file ends (or turns corrupt) at byte `off`: what came before is audited."""
    stats.truncated = True
    stats.truncated_offset = off
    stats.warnings.append(f"{stats.path}: truncated at byte offset {off}: {why}; "
                          "audited up to the last whole record")
