"""Pieces every front door builds the same way: scoper, locator, jurisdictions, policies, pipeline."""

from __future__ import annotations

from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper
from agent.pipeline import Pipeline
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies


def build_locator(args) -> Locator:
    scoper = Scoper(public_nets=getattr(args, "public_net", ()), local_nets=getattr(args, "local_net", ()))
    return Locator(getattr(args, "geoip_db", ()), scoper)


def build_pipeline(args) -> Pipeline:
    from agent.cli import shipped_policies

    jur = Jurisdictions.load()
    policies = load_policies(args.policies or shipped_policies(), jur)
    locator = build_locator(args)
    return Pipeline(policies, jur, locator, locator.scoper)
