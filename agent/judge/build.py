"""The pipeline a configuration asks for: policies, jurisdictions, recipients, locator, scope.

One function for the daemon (at start and on reload), `policy check --config` and the enforcement
compiler, so all three judge with the same pieces.
"""

from __future__ import annotations

import logging

from agent.config import Config
from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper
from agent.judge.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies

log = logging.getLogger("egress-agent")


def build_pipeline(cfg: Config, host_addresses: tuple[str, ...] = ()) -> Pipeline:
    """`host_addresses`: the host's own addresses, local like `local_nets` (a public-IP server's
    outbound flows are egress)."""
    from agent.output import shipped_policies

    jur = Jurisdictions.load()
    policies = load_policies(cfg.policies or shipped_policies(), jur)
    scoper = Scoper(public_nets=cfg.public_nets,
                    local_nets=tuple(cfg.local_nets) + tuple(host_addresses) + cfg.exporter_nets())
    register = None
    if cfg.recipients:
        from datetime import UTC, datetime

        from agent.policy.recipients import load_recipients

        register, warnings = load_recipients(cfg.recipients, policies, jur, datetime.now(UTC).date())
        for w in warnings:
            log.warning("%s", w)
    return Pipeline(policies, jur, Locator(cfg.geoip_databases, scoper), scoper, register=register)
