"""Enforcement dry-run in the metrics: a policy's outbound violations count as would-refuse only
while both the policy (`enforce: dry-run`) and the agent's switch ask for it; inbound never."""

from __future__ import annotations

from types import SimpleNamespace

from agent.flow import Outcome, Verdict
from agent.sinks.metrics import Metrics


def _value(m: Metrics, name: str, **labels) -> float:
    total = 0.0
    for fam in m.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


POLICIES = [SimpleNamespace(name="eu-data", enforce="dry-run"), SimpleNamespace(name="pipl", enforce="observe")]
OUT = (Verdict("eu-data", Outcome.VIOLATION, "outside-allowed", "m", "high"),
       Verdict("pipl", Outcome.VIOLATION, "outside-allowed", "m", "critical"))
OK = (Verdict("eu-data", Outcome.COMPLIANT, "allowed", "m", "high"),)


def test_would_refuse_counts_dry_run_policies_outbound_violations():
    m = Metrics()
    m.enforcement(POLICIES, "dry-run")
    m.judged_counts(OUT, (), "US", 100)
    m.judged_counts(OUT, (), "US", 100)
    m.judged_counts(OK, (), "DE", 100)
    m.judged_counts(OUT, (), "CN", 100, direction="inbound")  # inbound connections are never refused
    m.judged_counts(OUT, (), "US", 50, bytes_only=True)  # more bytes of a counted flow: not a new one
    m.flush()
    assert _value(m, "egress_agent_enforcement_would_refuse_total", policy="eu-data", country="US") == 2
    assert _value(m, "egress_agent_enforcement_would_refuse_total") == 2
    assert _value(m, "egress_agent_enforcement_mode", policy="eu-data", mode="dry-run") == 1
    assert _value(m, "egress_agent_enforcement_mode", policy="pipl", mode="observe") == 1


def test_the_switch_at_observe_counts_nothing_and_a_reload_applies_at_once():
    m = Metrics()
    m.enforcement(POLICIES, "observe")
    m.judged_counts(OUT, (), "US", 100)
    m.flush()
    assert _value(m, "egress_agent_enforcement_would_refuse_total") == 0
    assert _value(m, "egress_agent_enforcement_mode", policy="eu-data", mode="observe") == 1
    m.enforcement(POLICIES, "dry-run")  # the same verdicts (cached plans) now count
    m.judged_counts(OUT, (), "US", 100)
    m.flush()
    assert _value(m, "egress_agent_enforcement_would_refuse_total", policy="eu-data") == 1
