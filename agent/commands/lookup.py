"""`egress-agent lookup`: where each address is, with scope, jurisdictions and provenance."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime

from agent.commands.common import build_locator
from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions


def run_lookup(args) -> int:
    locator = build_locator(args, typed=True)  # one record per address, read whole: geoip2's models
    jur = Jurisdictions.load()
    today = datetime.now(UTC).date()  # memberships change at UTC midnight (as the engine's flow_day)
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
    for col in ("address", "scope", "country", "other", "AS", "jurisdictions", "source"):
        t.add_column(col, overflow="fold", no_wrap=col in ("address", "scope"))
    for r in rows:
        other = [f"reg. {r['registered_country']}" if r["registered_country"] else "",
                 f"repr. {r['represented_country']}" if r["represented_country"] else "",
                 f"continent {r['continent']}" if r["continent"] and not r["country"] else "",
                 "anycast" if r["anycast"] else ""]
        asn = f"AS{r['asn']} {r['as_org'] or ''}".strip() if r["asn"] else "-"
        t.add_row(r["ip"] + (f"\n→ {r['lookup_ip']}" if r["lookup_ip"] else ""), r["scope"],
                  r["country"] or f"[yellow]unknown: {r['unknown_reason']}[/]",
                  ", ".join(x for x in other if x) or "-", asn, " ".join(r["jurisdictions"]) or "-",
                  r["source"] or "-")
    Console().print(t)
    return 0
