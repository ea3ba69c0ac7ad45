"""`egress-agent lookup`: where each address is, with scope, jurisdictions and provenance."""

from __future__ import annotations

import ipaddress
import json
import time

from agent.commands.common import build_locator
from agent.errors import UserError
from agent.flow import Flow
from agent.policy.engine import flow_day
from agent.policy.jurisdictions import Jurisdictions


def run_lookup(args) -> int:
    locator = build_locator(args)
    jur = Jurisdictions.load()
    today = flow_day(Flow(0, "0.0.0.0", 0, "0.0.0.0", 0, first_seen=time.time()))
    rows = []
    for a in args.addresses:
        try:
            ip = str(ipaddress.ip_address(a.strip("[]")))
        except ValueError:
            raise UserError(f"lookup: '{a}' is not an IPv4 or IPv6 address") from None
        loc = locator.locate(ip)
        known = loc.country if loc.unknown_reason is None else None
        rows.append({
            "ip": ip, "scope": loc.scope, "lookup_ip": loc.lookup_ip, "country": loc.country,
            "registered_country": loc.registered_country, "represented_country": loc.represented_country,
            "continent": loc.continent, "in_eu": loc.in_eu, "anycast": loc.anycast, "asn": loc.asn,
            "as_org": loc.as_org, "jurisdictions": jur.groups_of(known, today),
            "unknown_reason": loc.unknown_reason, "source": loc.source,
            "provenance": [{"database": d, "build_date": b or None} for d, b in loc.provenance],
        })
    if args.format == "json":
        for r in rows:
            print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in ("ip", "scope", "country", "registered", "represented", "continent", "in_eu", "asn",
                "as_org", "jurisdictions", "source / unknown"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["ip"] + (f" (→ {r['lookup_ip']})" if r["lookup_ip"] else ""), r["scope"],
                  r["country"] or "-", r["registered_country"] or "-", r["represented_country"] or "-",
                  r["continent"] or "-", "-" if r["in_eu"] is None else str(r["in_eu"]).lower(),
                  str(r["asn"] or "-"), r["as_org"] or "-", ", ".join(r["jurisdictions"]) or "-",
                  (r["source"] or "-") + (f" / {r['unknown_reason']}" if r["unknown_reason"] else ""))
    Console().print(t)
    return 0
