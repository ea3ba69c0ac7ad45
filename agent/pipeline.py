"""The one path every front door uses: flow -> enrich (where) -> evaluate (each policy) -> verdicts.

Contract: `Pipeline.judge(flow)` is synchronous and has no side effects beyond bounded caches:
the locator's per-address cache, and a verdict cache keyed on exactly the flow fields the loaded
policies can look at (destination, day, protocol; source address, destination port, process or
hostname only when some policy selects on them). The engine is pure, so a cached verdict is the
verdict. `clear()` drops both (the daemon calls it when the GeoIP database changes).

`egress-agent audit`, `egress-agent run` and `egress-agent policy test` all build a Pipeline and
call `judge`, so a verdict in a report and a verdict in a metric cannot disagree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from agent.enrich.scope import Scoper
from agent.flow import Flow, Location, Outcome, Verdict
from agent.policy.engine import evaluate, flow_day
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.model import Policy


@dataclass(frozen=True, slots=True)
class Judged:
    flow: Flow
    location: Location
    verdicts: tuple[Verdict, ...]
    jurisdictions: tuple[str, ...]  # groups the destination country belongs to at the flow's time

    @property
    def worst(self) -> Outcome:
        order = [Outcome.VIOLATION, Outcome.INDETERMINATE, Outcome.EXEMPT, Outcome.COMPLIANT]
        outs = {v.outcome for v in self.verdicts}
        return next((o for o in order if o in outs), Outcome.NOT_APPLICABLE)


CACHE_SIZE = 65536


class Pipeline:
    def __init__(self, policies: list[Policy], jurisdictions: Jurisdictions, locator, scoper: Scoper):
        self.policies = policies
        self.jurisdictions = jurisdictions
        self.locator = locator
        self.scoper = scoper
        sel = [p.applies_to for p in policies]
        dests = [d for p in policies for d in (p.allow, p.deny, *(e.destinations for e in p.exceptions)) if d]
        self._by_src = any(s.sources for s in sel)
        self._by_port = any(s.ports for s in sel)
        self._by_who = any(s.processes or s.users or s.units or s.containers for s in sel)
        self._by_host = any(d.hostnames for d in dests)
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()

    def clear(self):
        self._cache.clear()
        self.locator._cache.clear()

    def is_egress(self, flow: Flow) -> bool:
        return self.scoper.is_egress(flow.src, flow.dst)

    def _key(self, flow: Flow) -> tuple:
        return (flow.dst, flow_day(flow), flow.proto, flow.src if self._by_src else None,
                flow.dport if self._by_port else None, flow.who if self._by_who else None,
                flow.hostname if self._by_host else None)

    def judge(self, flow: Flow) -> Judged:
        key = self._key(flow)
        hit = self._cache.get(key)
        if hit is None:
            loc = self.locator.locate(flow.dst)
            verdicts = tuple(evaluate(flow, loc, p, self.jurisdictions) for p in self.policies)
            groups = ()
            if loc.unknown_reason is None and loc.country:
                groups = tuple(self.jurisdictions.groups_of(loc.country, flow_day(flow)))
            hit = self._cache[key] = (loc, verdicts, groups)
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return Judged(flow, *hit)
