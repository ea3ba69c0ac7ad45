"""Where the location data can change: the cuts that split the address space into pieces a database
answers alike for every address (so judging one address of a piece judges all of it).

`location_cuts(locator) -> Cuts`:

* a MaxMind-format database: the start and end + 1 of every network it holds (maxminddb's
  iteration over the search tree), for every configured database;
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
from dataclasses import dataclass, field

import numpy as np

_SKIP8 = frozenset({0, 10, 127} | set(range(224, 256)))  # never public: no probe


@dataclass
class Cuts:
    cuts: dict[int, set[int]] = field(default_factory=lambda: {4: set(), 6: set()})
    listable: frozenset = frozenset({4, 6})  # families whose location data is fully listed
    networks: int = 0  # database networks (or registration runs) read


def location_cuts(locator) -> Cuts:
    if not locator.dbs:
        c4 = embedded_v4_cuts()
        return Cuts({4: set(c4), 6: set()}, frozenset({4}), len(c4))
    out = Cuts()
    for db in locator.dbs:
        for net, _rec in db.reader:
            lo = int(net.network_address)
            out.cuts[net.version].add(lo)
            out.cuts[net.version].add(lo + net.num_addresses)
            out.networks += 1
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
