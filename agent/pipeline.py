"""The one path every front door uses: flow -> enrich (where) -> evaluate (each policy) -> verdicts.

Contract: `Pipeline.judge(flow)` is synchronous and has no side effects beyond the locator's
bounded cache. `egress-agent audit`, `egress-agent run` and `egress-agent policy test` all build a
Pipeline and call `judge`, so a verdict in a report and a verdict in a metric cannot disagree.
"""

from __future__ import annotations

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


class Pipeline:
    def __init__(self, policies: list[Policy], jurisdictions: Jurisdictions, locator, scoper: Scoper):
        self.policies = policies
        self.jurisdictions = jurisdictions
        self.locator = locator
        self.scoper = scoper

    def is_egress(self, flow: Flow) -> bool:
        return self.scoper.is_egress(flow.src, flow.dst)

    def judge(self, flow: Flow) -> Judged:
        loc = self.locator.locate(flow.dst)
        verdicts = tuple(evaluate(flow, loc, p, self.jurisdictions) for p in self.policies)
        groups = ()
        if loc.unknown_reason is None and loc.country:
            groups = tuple(self.jurisdictions.groups_of(loc.country, flow_day(flow)))
        return Judged(flow, loc, verdicts, groups)
