"""Per-flow packets, bytes, first and last seen and opener hints, from decoded keys: the
capture's aggregation of one-way flows (`agent.connections` pairs them into connections).

Contract: `FlowAccumulator` takes key words in bulk (`add_keys`, `add_groups`: numpy, merged in
bulk once enough rows are pending) or one scalar-decoded packet at a time (`add_one`), and gives
one row per distinct (version, proto, src, sport, dst, dport) in `table(source)`. A hash collision
can never merge two flows: rows are verified against their group's representative.
"""

from __future__ import annotations

import numpy as np

from agent.flow import Flow
from agent.flowtable import IDLE_OTHER, IDLE_TCP, FlowTable, first_rows, group_words, idle_timeouts, split_idle
from agent.wire import decode as dec


class FlowAccumulator:
    """Per-flow packets, bytes, first and last seen, keyed by five 64-bit words.

    Key words: (version<<40 | proto<<32 | sport<<16 | dport, src high, src low, dst high, dst low).
    Grouping hashes the words to one uint64 and verifies every row against its group's
    representative, so a hash collision can never merge two flows (it falls back to exact rows).
    """

    MERGE_ROWS = 1 << 21  # pending chunk groups merged (vectorised) past this many rows

    def __init__(self):
        self.by_key: dict[tuple, list] = {}  # the scalar path (add_one)
        self._retired: list[tuple] = []  # (key, row) of scalar-path flows cut off by an idle gap
        self._pending: list[tuple] = []
        self._distinct = True  # no two pending rows are parts of one connection
        self._rows = 0

    @staticmethod
    def _reduce(words, pk, by, first, last, hints):
        """Rows of the same key summed into one per connection: the key's rows, cut where they show
        an idle gap (`split_idle`), so a 5-tuple used again after its idle timeout is a row of its own."""
        rep, inv = group_words(words)
        g = len(rep)
        out_first = np.full(g, np.inf)
        out_last = np.full(g, -np.inf)
        np.minimum.at(out_first, inv, first)
        np.maximum.at(out_last, inv, last)
        timeout = idle_timeouts((words[rep, 0] >> np.uint64(32)) & np.uint64(0xFF))
        maybe = (out_last - out_first) > timeout
        if maybe.any():
            inv, g = split_idle(inv, g, first, last, timeout[inv], maybe)
            rep = first_rows(inv, g)
            out_first = np.full(g, np.inf)
            out_last = np.full(g, -np.inf)
            np.minimum.at(out_first, inv, first)
            np.maximum.at(out_last, inv, last)
        out_pk = np.bincount(inv, weights=pk, minlength=g).astype(np.int64)
        out_by = np.bincount(inv, weights=by, minlength=g)
        out_hints = np.zeros(g, dtype=np.int64)
        np.bitwise_or.at(out_hints, inv, np.asarray(hints, dtype=np.int64))
        return words[rep], out_pk, out_by, out_first, out_last, out_hints

    def add_keys(self, words: np.ndarray, iplen, ts, hints):
        if len(words) == 0:
            return
        self.add_groups(*self._reduce(words, np.ones(len(words)), iplen.astype(np.float64), ts, ts, hints),
                        distinct=True)

    def add_groups(self, reps, pk, by, first, last, hints, distinct: bool = False):
        """Take per-chunk groups (key words and their packets, bytes, first and last seen, hints);
        they are merged with numpy, in bulk, once enough have accumulated (and at the end).
        `distinct`: the caller knows no two rows are parts of one connection (so a lone chunk
        needs no merge)."""
        self._distinct = distinct and not self._pending
        self._pending.append((reps, np.asarray(pk, dtype=np.float64), np.asarray(by, dtype=np.float64),
                              np.asarray(first, dtype=np.float64), np.asarray(last, dtype=np.float64),
                              np.asarray(hints, dtype=np.int64)))
        self._rows += len(reps)
        if self._rows > self.MERGE_ROWS and len(self._pending) > 1:
            self._merge()

    def _merge(self):
        if len(self._pending) > 1 or (self._pending and not self._distinct):
            cols = list(zip(*self._pending, strict=True))
            merged = self._reduce(np.concatenate(cols[0]), *(np.concatenate(c) for c in cols[1:]))
            self._pending = [(merged[0], merged[1].astype(np.float64), *merged[2:])]
            self._rows = len(merged[0])
            self._distinct = True

    def add_one(self, d: dec.Decoded, ts: float):
        s, t = int.from_bytes(d.src, "big"), int.from_bytes(d.dst, "big")
        key = ((d.version << 40) | (d.proto << 32) | (d.sport << 16) | d.dport,
               s >> 64, s & 0xFFFFFFFFFFFFFFFF, t >> 64, t & 0xFFFFFFFFFFFFFFFF)
        row = self.by_key.get(key)
        if row is not None:
            idle = IDLE_TCP if d.proto == 6 else IDLE_OTHER
            if ts > row[3] + idle or ts < row[2] - idle:  # quiet too long: a new connection (as _walk.c)
                self._retired.append((key, row))
                row = None
        if row is None:
            self.by_key[key] = [1, d.iplen, ts, ts, d.hints]
        else:
            row[0] += 1
            row[1] += d.iplen
            row[2] = min(row[2], ts)
            row[3] = max(row[3], ts)
            row[4] |= d.hints

    def flows(self, source: str) -> list[Flow]:
        return self.table(source).flows()

    def table(self, source: str) -> FlowTable:
        """The flows as columns, in the order of the merged groups."""
        if self.by_key or self._retired:  # scalar-path flows join the bulk ones
            rows = [*self._retired, *self.by_key.items()]
            keys = np.array([k for k, _ in rows], dtype=np.uint64).reshape(-1, 5)
            self.add_groups(keys, *([v[k] for _, v in rows] for k in range(5)))
            self.by_key, self._retired = {}, []
        self._merge()
        if not self._pending:
            z = np.zeros(0)
            return FlowTable(z, z, z, z, z, z, z, z, z, z, z, z, z, source, hints=z)
        reps, pk, by, first, last, hints = self._pending[0]
        w0 = reps[:, 0]
        v4 = (w0 >> np.uint64(40)) == 4
        return FlowTable((w0 >> np.uint64(32)) & np.uint64(0xFF), (w0 >> np.uint64(16)) & np.uint64(0xFFFF),
                         w0 & np.uint64(0xFFFF), v4, reps[:, 1], reps[:, 2], v4, reps[:, 3], reps[:, 4],
                         pk.astype(np.int64), by.astype(np.int64), first, last, source, hints=hints)

