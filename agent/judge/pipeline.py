"""The one path every front door uses: flow -> enrich (where) -> evaluate (each policy) -> verdicts.

Contract: `Pipeline.judge(flow)` is synchronous and has no side effects beyond bounded caches:
the locator's per-address cache, and a verdict cache keyed on exactly the facts the loaded
policies can look at (the location's fields but not the address, which of the policies' networks
hold the destination and the source, day, protocol; destination port, process or hostname only
when some policy selects on them). The engine is pure, so a cached verdict is the verdict; only
its message names another flow's destination, which `Judged.verdicts` rewrites. Distinct
destinations in one country therefore cost one GeoIP lookup each, not a policy evaluation.
`clear()` drops both caches (the daemon calls it when the GeoIP database changes).

`egress-agent audit`, `egress-agent run` and `egress-agent policy test` all build a Pipeline and
call `judge`, so a verdict in a report and a verdict in a metric cannot disagree.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace
from datetime import date

from agent.enrich.scope import Scoper
from agent.flow import Flow, Location, Outcome, Verdict, iso_time
from agent.policy.compiled import destination_networks, location_class, source_networks
from agent.policy.engine import PEER_NOUN, _day, _ip, evaluate, flow_day, peer_prefix
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.model import Policy


class Judged:
    """A judged flow: the flow, where its destination is, one verdict per policy, and the groups
    the destination country belongs to at the flow's time.

    Verdicts come from a cache shared by every flow with the same facts (see `Pipeline`); their
    messages name the destination (address and host name) of the flow that filled the cache.
    `verdicts` gives them with this flow's (rebuilt on first access, so a flow whose verdicts nobody
    reads costs nothing); `outcomes` gives the cached ones, whose policy, outcome, severity and
    reason are the same for every flow of the key (what metrics need).
    """

    __slots__ = ("flow", "location", "outcomes", "jurisdictions", "_for", "_fixed", "judged_at", "redated",
                 "inbound", "recipient")

    def __init__(self, flow: Flow, location: Location, verdicts: tuple[Verdict, ...],
                 jurisdictions: tuple[str, ...], written_for: tuple[str, str] | None = None,
                 judged_at: date | None = None, redated: str | None = None, inbound: bool = False,
                 recipient=None):
        self.flow, self.location, self.outcomes, self.jurisdictions = flow, location, verdicts, jurisdictions
        self.recipient = recipient  # the register's Recipient the flow goes to, or None
        self.inbound = inbound  # opened from the remote peer (flow.src); location is the peer's
        # (peer address, description prefix) of the flow whose judgement filled the cache
        self._for = written_for if written_for is not None else (self.peer, self.prefix)
        self._fixed = None
        self.judged_at = judged_at or flow_day(flow)
        self.redated = redated  # why the flow was judged at the as-of date, not its own time

    @property
    def peer(self) -> str:
        """The remote address: the destination of an outbound flow, the source of an inbound one."""
        return self.flow.src if self.inbound else self.flow.dst

    @property
    def prefix(self) -> str:
        f = self.flow
        return peer_prefix(self.peer, self.inbound, f.hostname, f.hostname_source)

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        if self._for == (self.peer, self.prefix):
            return self.outcomes
        if self._fixed is None:
            self._fixed = tuple(replace(v, message=self.message(v)) for v in self.outcomes)
        return self._fixed

    def message(self, v: Verdict) -> str:
        """The message of one of `outcomes`, naming this flow's remote address and host name."""
        return rewrite_message(v.message, self._for, self.peer, self.prefix, self.inbound)

    def with_flow(self, flow: Flow) -> Judged:
        """The same judgement for an updated flow record (counters at its end); same destination."""
        j = Judged(flow, self.location, self.outcomes, self.jurisdictions, self._for, self.judged_at, self.redated,
                   self.inbound, self.recipient)
        j._fixed = self._fixed
        return j

    @property
    def worst(self) -> Outcome:
        order = [Outcome.VIOLATION, Outcome.INDETERMINATE, Outcome.EXEMPT, Outcome.COMPLIANT]
        outs = {v.outcome for v in self.outcomes}
        return next((o for o in order if o in outs), Outcome.NOT_APPLICABLE)


def rewrite_message(message: str, written_for: tuple[str, str], peer: str, prefix: str, inbound: bool) -> str:
    """A cached verdict's message, written for the flow `written_for` = (peer, description prefix),
    rewritten to name another flow's remote address `peer` and its prefix."""
    old_peer, old_prefix = written_for
    if old_prefix == prefix:
        return message
    if message.startswith(old_prefix):
        return prefix + message[len(old_prefix):]
    noun = PEER_NOUN[inbound]
    old = f"{noun} {old_peer} "  # messages without a location description ("... is loopback")
    return f"{noun} {peer} " + message[len(old):] if message.startswith(old) else message


CACHE_SIZE = 65536


PLAUSIBLE_FROM = 788918400.0  # 1995-01-01T00:00:00Z: no flow record we judge is older


class Pipeline:
    """`as_of`: the day a flow without a plausible time is judged at (no time, before 1995, or more
    than a day after the as-of date); None means today (UTC), which is what the live daemon wants.
    """

    def __init__(self, policies: list[Policy], jurisdictions: Jurisdictions, locator, scoper: Scoper,
                 as_of: date | None = None, register=None):
        self.as_of = as_of
        self.register = register if register else None  # agent.policy.recipients.Register
        self.policies = policies
        self.jurisdictions = jurisdictions
        self.locator = locator
        self.scoper = scoper
        sel = [p.applies_to for p in policies]
        dests = [d for p in policies for d in (p.allow, p.deny, *(e.destinations for e in p.exceptions)) if d]
        self._dst_nets = destination_networks(policies)
        self._src_nets = source_networks(policies)
        self._by_port = any(s.ports for s in sel)
        self._by_who = any(s.processes or s.users or s.units or s.containers for s in sel)
        self._by_host = any(d.hostnames for d in dests)
        if self.register is not None:
            self._by_host = self._by_host or any(r.match.hostnames for r in self.register.recipients)
        self.inbound = any("inbound" in p.directions for p in policies)
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()

    def clear(self):
        self._cache.clear()
        self.locator.clear()

    def is_egress(self, flow: Flow) -> bool:
        return self.scoper.is_egress(flow.src, flow.dst)

    def is_inbound(self, flow: Flow) -> bool:
        """Opened from a public address to a local one, and some policy judges inbound connections."""
        return self.inbound and self.scoper.is_egress(flow.dst, flow.src)

    def judged_direction(self, flow: Flow) -> str | None:
        if self.is_egress(flow):
            return "outbound"
        return "inbound" if self.is_inbound(flow) else None

    def judging_day(self, flow: Flow) -> tuple[date, str | None]:
        """The day a flow is judged at, and why it is not its own first-seen day (or None)."""
        t = flow.first_seen
        as_of = self.as_of or _day(int(time.time() // 86400))  # today (UTC), from the memoised days
        if not t:
            return as_of, "no timestamp"
        if t < PLAUSIBLE_FROM:
            return as_of, f"timestamp {iso_time(t)} is before 1995"
        day = flow_day(flow)
        if (day - as_of).days > 1:
            return as_of, f"timestamp {iso_time(t)} is more than a day after the as-of date {as_of}"
        return day, None

    def _name_claim(self, rec, flow: Flow, loc: Location, day: date) -> str | None:
        """When the register matched the recipient by host name only and the address is located
        outside the recipient's declared processing locations: why that is no exemption (a client
        chooses its SNI; the address says where the data goes). None when the match stands."""
        country = loc.country if loc.unknown_reason is None else None
        if rec is None or country is None:
            return None
        for where in rec.processing_locations:
            m = self.jurisdictions.membership(where, country, day)
            if m is not None and m.condition is None:
                return None
        return (f"the host name {flow.hostname} ({flow.hostname_source or 'from the flow log'}) names recipient "
                f"{rec.id}, but the address is located in {country}, outside the recipient's declared processing "
                f"locations ({', '.join(rec.processing_locations)}): not an exemption")

    def _key(self, flow: Flow, loc: Location, day: date) -> tuple:
        """Everything `evaluate` reads, for every loaded policy (see agent.policy.compiled)."""
        return (location_class(loc), self._dst_nets.mask(flow.dst), self._src_nets.mask(flow.src),
                day, flow.proto, flow.dport if self._by_port else None,
                flow.who if self._by_who else None,
                (flow.hostname, flow.hostname_source) if self._by_host else None)

    def judge(self, flow: Flow, inbound: bool = False) -> Judged:
        """Judge an outbound flow, or (inbound=True) a connection a remote peer opened to a local host:
        then the policies see it from the local side and the peer's location is what counts."""
        view = replace(flow, src=flow.dst, dst=flow.src) if inbound else flow
        loc = self.locator.locate(view.dst)
        day, redated = self.judging_day(flow)
        rec = claim = None
        if self.register is not None and not inbound:
            rec, how = self.register.match_how(flow.hostname, loc.asn, _ip(flow.dst))
            if how == "hostname":
                claim = self._name_claim(rec, flow, loc, day)
        key = (inbound, rec.id if rec is not None else None, claim, *self._key(view, loc, day))
        hit = self._cache.get(key)
        if hit is None:
            basis = None if claim else rec  # a name alone never makes an outside address the recipient's
            verdicts = tuple(evaluate(view, loc, p, self.jurisdictions, day, inbound, basis) for p in self.policies)
            if claim:
                verdicts = tuple(replace(v, message=f"{v.message}; {claim}") if v.outcome != Outcome.COMPLIANT
                                 else v for v in verdicts)
            groups = ()
            if loc.unknown_reason is None and loc.country:
                groups = tuple(self.jurisdictions.groups_of(loc.country, day))
            hit = self._cache[key] = (verdicts, groups, (view.dst, peer_prefix(view.dst, inbound, flow.hostname,
                                                                                flow.hostname_source)))
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return Judged(flow, loc, hit[0], hit[1], hit[2], day, redated, inbound, rec)
