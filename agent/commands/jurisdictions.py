"""`egress-agent jurisdictions [GROUP] [--at DATE]`: the legal data the verdicts rest on.

For each group (or the one named): title, source, when it was last reviewed, and every entry with
its dates, condition and source; with --at, only the entries in force on that UTC day (a DPO's
"which countries counted as adequate on the day of this transfer?"). Table or JSON.
"""

from __future__ import annotations

import json

from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions


def describe(jur: Jurisdictions, name: str | None, at) -> list[dict]:
    if name is not None and name.upper() not in jur.groups:
        hint = jur.suggest(name)
        raise UserError(f"jurisdictions: no group '{name}'" + (f"; did you mean {hint}?" if hint else "")
                        + f" (groups: {', '.join(sorted(jur.groups))})")
    out = []
    for g in sorted(jur.groups.values(), key=lambda g: g.name):
        if name is not None and g.name != name.upper():
            continue
        members = [m for m in g.members if at is None or m.in_force(at)]
        out.append({
            "group": g.name, "title": g.title, "source": g.source, "includes": list(g.include),
            "reviewed": g.reviewed.isoformat() if g.reviewed else None, "file": g.file,
            "as_of": at.isoformat() if at else None,
            "members": [{"country": m.country, "from": m.start.isoformat(),
                         "until": m.end.isoformat() if m.end else None, "condition": m.condition,
                         "excludes": " ".join(m.excludes.split()) if m.excludes else None,
                         "source": " ".join(m.source.split())} for m in members],
            "facts": [{"country": cc, "date": day.isoformat(), "what": what, "source": source}
                      for cc, day, what, source in g.facts],
        })
    return out


def run_jurisdictions(args) -> int:
    jur = Jurisdictions.load()
    groups = describe(jur, args.group, args.at)
    if args.format == "json":
        print(json.dumps(groups, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for g in groups:
        when = f" in force on {g['as_of']}" if g["as_of"] else ""
        t = Table(title=f"{g['group']}: {g['title']}{when} (reviewed {g['reviewed']})", title_justify="left")
        for col in ("country", "from", "until (exclusive)", "condition / excludes", "source"):
            t.add_column(col, overflow="fold")
        for m in g["members"]:
            limits = m["condition"] and f"only when: {m['condition']}" or m["excludes"] and f"excludes: {m['excludes']}"
            t.add_row(m["country"], m["from"], m["until"] or "", limits or "", m["source"])
        console.print(t)
        if g["includes"]:
            console.print(f"  and every member of: {', '.join(g['includes'])}")
        for f in g["facts"]:  # dated facts that do not change membership
            console.print(f"  {f['country']} {f['date']}: {f['what']} ({f['source']})", highlight=False)
    return 0
