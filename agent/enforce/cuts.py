"""Where the location data can change: the cuts that split the address space into pieces a database
answers alike for every address (so judging one address of a piece judges all of it).

`location_cuts(locator) -> Cuts`:

* a MaxMind-format database: the start and end + 1 of every run of adjacent networks with equal
  Location fields (maxminddb's iteration over the search tree, in address order), for every
  configured database; `Cuts.location_key` tells pieces with equal answers apart from the rest, so
  the compiler judges each distinct (answers, policy networks) once, not each piece;
* the embedded registration data (iptocc), which has no listing: IPv4 is probed at the first and last
  address of every /24 of the public /8s, and a /24 whose two ends differ is probed address by
  address. A registration block that starts and ends strictly inside one /24 with the same country
  on both sides is missed (none in 2,000,000 random addresses: tests/enforce/test_cuts.py). IPv6
  cannot be probed (2^45 /48s): `Cuts.listable` leaves it out, and the compiler refuses only the
  networks policies deny by name there.

The embedded probe takes seconds; its result is kept for the life of the process (the data is in
the installed package and cannot change under it).
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

_SKIP8 = frozenset({0, 10, 127} | set(range(224, 256)))  # never public: no probe


@dataclass
class Cuts:
    cuts: dict[int, set[int]] = field(default_factory=lambda: {4: set(), 6: set()})
    listable: frozenset = frozenset({4, 6})  # families whose location data is fully listed
    networks: int = 0  # database networks (or registration runs) read
    # per family, per database: (run starts, run ends, an id per run: equal ids, equal Location fields);
    # empty for the embedded data (each piece is located on its own)
    runs: dict[int, list] = field(default_factory=lambda: {4: [], 6: []})

    def location_key(self, v: int, n: int) -> tuple | None:
        """Equal keys: every database answers address n as it answers the other (None: unknown)."""
        if not self.runs[v]:
            return None
        key = []
        for starts, ends, ids in self.runs[v]:
            i = bisect_right(starts, n) - 1
            key.append(ids[i] if i >= 0 and n <= ends[i] else -1)
        return tuple(key)


def location_cuts(locator) -> Cuts:
    if not locator.dbs:
        c4 = embedded_v4_cuts()
        return Cuts({4: set(c4), 6: set()}, frozenset({4}), len(c4))
    from agent.enrich.geoip import fields_from_record

    out = Cuts()
    for db in locator.dbs:
        nets: dict[int, list] = {4: [], 6: []}
        for net, rec in db.reader:  # not in address order across the tree's aliases: sorted below
            lo = int(net.network_address)
            hi = lo + (1 << (net.max_prefixlen - net.prefixlen)) - 1  # num_addresses: a slow property
            f = tuple(fields_from_record(rec).values()) if isinstance(rec, dict) else (repr(rec),)
            nets[net.version].append((lo, hi, f))
            out.networks += 1
        runs: dict[int, list] = {4: [], 6: []}  # [start, end, fields] of adjacent networks answering alike
        for v, found in nets.items():
            run = runs[v]
            for lo, hi, f in sorted(found, key=lambda x: x[0]):
                if run and run[-1][1] + 1 == lo and run[-1][2] == f:
                    run[-1][1] = hi  # the same answer goes on: no cut (a database lists a country in many blocks)
                else:
                    run.append([lo, hi, f])
        for v, run in runs.items():
            ids: dict[tuple, int] = {}
            keys = [ids.setdefault(r[2], len(ids)) for r in run]
            out.runs[v].append(([r[0] for r in run], [r[1] for r in run], keys))
            for lo, hi, _f in run:
                out.cuts[v].add(lo)
                out.cuts[v].add(hi + 1)
    return out


def _text(n: int) -> str:
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


@functools.cache
def embedded_v4_cuts() -> tuple[int, ...]:
    """Sorted addresses where the embedded registration country may change (see the module doc)."""
    import iptocc

    starts = [f"{b}.{c}.0" for b in range(256) for c in range(256)]
    ends = [s[:-1] + "255" for s in starts]
    out: list[int] = []
    for a in range(256):
        if a in _SKIP8:
            out.append(a << 24)
            continue
        lo = np.array(iptocc.country_code([f"{a}.{s}" for s in starts]), dtype=object)
        hi = np.array(iptocc.country_code([f"{a}.{s}" for s in ends]), dtype=object)
        base = a << 24
        # a /24 starts a new run when its first address differs from the previous /24's last
        prev = np.empty(len(lo), dtype=object)
        prev[0], prev[1:] = "?", hi[:-1]
        out.extend((base + (np.flatnonzero(lo != prev) << 8)).tolist())
        for k in np.flatnonzero(lo != hi).tolist():  # mixed /24: address by address
            first = base + (k << 8)
            row = iptocc.country_code([_text(first + i) for i in range(256)])
            out.extend(first + i for i in range(1, 256) if row[i] != row[i - 1])
    out.append(1 << 32)
    return tuple(sorted(set(out)))
