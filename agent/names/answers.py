"""A passive DNS answer cache: which name a client was last told an address belongs to.

Contract: `AnswerCache.add(client, address, qname, chain, ttl, at)` records one answer seen at
time `at` (POSIX seconds); `lookup(client, address, at)` returns the `Answer` a flow opened at
`at` from `client` to `address` should carry, or None: among the answers to that client for that
address given at or before `at`, the most recent one still in force. An answer is in force until
its TTL runs out plus `grace` seconds, because resolvers and applications keep answers a little
past their TTL (browsers pin them for up to a minute; the default grace is 30 s and is a setting).
Keys are packed 16-byte addresses (IPv4 as 12 zero bytes + 4) as in `agent.wire.decode`.

Bounded: at most `size` (client, address) pairs, least recently answered dropped first (counted
in `evicted`), and at most KEEP answers per pair (the newest).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

KEEP = 4


class Answer(NamedTuple):
    at: float  # when the answer was seen
    expires: float  # at + TTL (without grace)
    name: str  # the name the client asked for
    chain: tuple[str, ...]  # asked-for name, CNAME targets, ..., the owner of the address record


class AnswerCache:
    def __init__(self, size: int = 262144, grace: float = 30.0):
        self.size, self.grace = size, grace
        self.evicted = 0
        self._by: OrderedDict[tuple[bytes, bytes], list[Answer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by)

    def add(self, client: bytes, address: bytes, name: str, chain: tuple[str, ...], ttl: int, at: float):
        key = (client, address)
        rows = self._by.get(key)
        if rows is None:
            rows = self._by[key] = []
            if len(self._by) > self.size:
                self._by.popitem(last=False)
                self.evicted += 1
        else:
            self._by.move_to_end(key)
        rows.append(Answer(at, at + ttl, name, chain))
        if len(rows) > KEEP:
            rows.sort(key=lambda a: a.at)
            del rows[:-KEEP]

    def lookup(self, client: bytes, address: bytes, at: float) -> Answer | None:
        best = None
        for a in self._by.get((client, address), ()):
            if a.at <= at <= a.expires + self.grace and (best is None or a.at > best.at):
                best = a
        return best
