"""What a set of policies can look at, compiled once per load into integer tables.

The engine (`agent.policy.engine.evaluate`) stays the one definition of a verdict. This module
only answers, cheaply and per flow, *which* of the facts the engine reads differ between two
flows, so the pipeline can reuse a verdict for every flow whose facts are the same:

* `NetMask`: for every network any policy names (allow, deny, exception destinations, or source
  selectors), whether an address is in it, as one integer bitmask from one bisect of a flattened
  interval table — instead of parsing the address and testing each network in turn.
* `VerdictKey`: the tuple of everything `evaluate` depends on for a flow and its location.

Tests compare verdicts through the cache with direct `evaluate` calls on random flows.
"""

from __future__ import annotations

from bisect import bisect_right

from agent.enrich.scope import ip_int


class NetMask:
    """Bitmask of the networks (in the given order) that contain an address."""

    def __init__(self, networks):
        self.networks = tuple(networks)
        self._starts: dict[int, list[int]] = {}
        self._masks: dict[int, list[int]] = {}
        for version, bits in ((4, 32), (6, 128)):
            spans = [(int(n.network_address), int(n.broadcast_address), 1 << i)
                     for i, n in enumerate(self.networks) if n.version == version]
            cuts = sorted({0} | {s for s, _, _ in spans} | {e + 1 for _, e, _ in spans if e + 1 < 1 << bits})
            masks = []
            for i, lo in enumerate(cuts):
                hi = cuts[i + 1] - 1 if i + 1 < len(cuts) else (1 << bits) - 1
                m = 0
                for s, e, bit in spans:
                    if s <= lo and hi <= e:
                        m |= bit
                masks.append(m)
            self._starts[version], self._masks[version] = cuts, masks

    def __bool__(self) -> bool:
        return bool(self.networks)

    def mask(self, ip: str) -> int:
        if not self.networks:
            return 0
        version, n = ip_int(ip)
        return self._masks[version][bisect_right(self._starts[version], n) - 1]

    def mask_int(self, version: int, n: int) -> int:
        """`mask` of an address already parsed (`ip_int`); there must be networks (truth test first)."""
        return self._masks[version][bisect_right(self._starts[version], n) - 1]


    def ids_many(self, v4, hi, lo):
        """For many addresses (numpy columns), an id per address such that equal ids mean equal
        `mask`: the index of a distinct mask value."""
        import numpy as np

        from agent.enrich.intervals import IntervalIndex

        if not self.networks:
            return np.zeros(len(v4), dtype=np.int64)
        if getattr(self, "_index", None) is None:
            self._index = IntervalIndex(self._starts[4], self._starts[6])
            ids: dict[int, int] = {}
            self._ids = {v: np.array([ids.setdefault(m, len(ids)) for m in self._masks[v]], dtype=np.int64)
                         for v in (4, 6)}
        idx = self._index.index(v4, hi, lo)
        return np.where(v4, self._ids[4][np.where(v4, idx, 0)], self._ids[6][np.where(v4, 0, idx)])


def destination_networks(policies) -> NetMask:
    nets = []
    for p in policies:
        for d in (p.allow, p.deny, *(e.destinations for e in p.exceptions)):
            if d:
                nets.extend(n for n in d.networks if n not in nets)
    return NetMask(nets)


def source_networks(policies) -> NetMask:
    nets = []
    for p in policies:
        nets.extend(n for n in p.applies_to.sources if n not in nets)
    return NetMask(nets)


def location_class(loc) -> tuple:
    """The fields of a Location that `evaluate` reads (everything but the address itself; the
    embedded IPv4 address a message names is one of them)."""
    return (loc.scope, loc.country, loc.registered_country, loc.continent, loc.asn, loc.as_org,
            loc.unknown_reason, loc.lookup_ip, loc.represented_country, loc.source)
