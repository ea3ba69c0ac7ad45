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
