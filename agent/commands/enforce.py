"""`egress-agent enforce status` and the refuse check of `policy check --config`.

`status` reads the agent's table as any process may (read-only; only its owner can change it) and
prints, per policy, the destination intervals, the connections refused and the last build. Exit 0
with the table, 1 when no table is loaded (nothing is refused), 2 on a usage error.

`refuse_problems(cfg, policies)` compiles what each policy with `enforce: refuse` would refuse on
this host (its config: local_nets, databases, enforcement.*), whatever the host's switch says, and
returns the never-refuse addresses it would catch: `policy check` exits 2 on any.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent.enforce.nft import TABLE
from agent.errors import UserError


def refuse_plan(cfg, only_refusing: bool = True):
    from agent.enforce.compile import compile_plan
    from agent.enforce.cuts import location_cuts
    from agent.enforce.never import never_refuse
    from agent.judge.build import build_pipeline

    pipe = build_pipeline(cfg)
    refusing = [p for p in pipe.policies if p.enforce == "refuse" or not only_refusing]
    if not refusing:
        return None
    opts = cfg.enforcement or {}
    keep, _skipped = never_refuse(cfg, tuple(cfg.local_nets) + cfg.exporter_nets(),
                                  opts.get("resolv_conf", "/etc/resolv.conf"))
    return compile_plan(pipe, refusing, keep, location_cuts(pipe.locator))


def _nft(netns: str | None, *args: str) -> str | None:
    """`nft ARGS` (in the namespace); None when the table (or set) does not exist."""
    pre = ["ip", "netns", "exec", netns] if netns else []
    try:
        r = subprocess.run([*pre, "nft", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("nft is not installed (apt install nftables)") from None
    if r.returncode != 0:
        if "No such file" in r.stderr:
            return None
        raise UserError(f"nft {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def _objects(netns: str | None, *args: str) -> list:
    out = _nft(netns, "-j", *args)
    return json.loads(out).get("nftables", []) if out else []


def read_table(netns: str | None) -> dict | None:
    """The table's header (flags, comment, hooks), counters and set sizes; None when there is none.
    Read piece by piece: nft 1.0.6's JSON of a whole owner table garbles the table's own line."""
    tables = _nft(netns, "list", "tables") or ""
    if f"table inet {TABLE}" not in tables:
        return None
    head = _nft(netns, "-t", "list", "table", "inet", TABLE) or ""  # -t: sets without their elements
    flags, comment = [], ""
    for line in head.splitlines():
        if line.startswith("\tflags "):
            flags = [f.strip() for f in line[7:].split(",")]
        elif line.startswith("\tcomment "):
            comment = line[9:].strip().strip('"')
    counters = {o["counter"]["name"]: o["counter"] for o in _objects(netns, "list", "counters", "table", "inet", TABLE)
                if "counter" in o}
    sizes = {}
    names = [line.split()[1] for line in head.splitlines() if line.strip().startswith("set ")]
    for name in names:
        objs = _objects(netns, "list", "set", "inet", TABLE, name)
        sizes[name] = len(next((o["set"].get("elem", []) for o in objs if "set" in o), []))
    return {"flags": flags, "comment": comment, "forward": "chain forward" in head,
            "counters": counters, "sizes": sizes}


def status(t: dict) -> dict:
    """What `enforce status` prints, as data."""
    out = []
    for key in sorted(t["counters"], key=lambda k: int(k[1:]) if k[1:].isdigit() else 0):
        c = t["counters"][key]
        row = {"policy": c.get("comment", key), "refused": c.get("packets", 0)}
        for v in (4, 6):
            row[f"ipv{v}"] = t["sizes"].get(f"{key}_dst{v}", 0)
            row[f"recent_ipv{v}"] = t["sizes"].get(f"{key}_seen{v}", 0)
            row[f"named_ipv{v}"] = t["sizes"].get(f"{key}_names{v}", 0)
        out.append(row)
    return {"table": {"name": TABLE, "owner": "owner" in t["flags"], "built": t["comment"], "forward": t["forward"],
                      "never_refuse": {f"ipv{v}": t["sizes"].get(f"never{v}", 0) for v in (4, 6)}},
            "policies": out}


def run_enforce(args) -> int:
    if args.netns and not os.path.exists(f"/run/netns/{args.netns}"):
        raise UserError(f"--netns {args.netns}: no such network namespace (ip netns list)")
    t = read_table(args.netns)
    if t is None:
        where = f" in netns {args.netns}" if args.netns else ""
        print(f"no enforcement table{where}: nothing is refused (no agent with enforce: refuse is running)")
        return 1
    st = status(t)
    if args.format == "json":
        print(json.dumps(st, indent=2))
        return 0
    t = st["table"]
    print(f"table inet {TABLE}: {'owned by the agent (fail-open)' if t['owner'] else 'not owned (removed at stop)'}"
          f"; hooks: output{' and forward' if t['forward'] else ''}")
    print(f"  {t['built'] or 'build time not recorded'}")
    print(f"  never refused: {t['never_refuse']['ipv4']} IPv4 and {t['never_refuse']['ipv6']} IPv6 intervals")
    for p in st["policies"]:
        print(f"  policy {p['policy']}: {p['ipv4']} IPv4 and {p['ipv6']} IPv6 intervals refused; "
              f"{p['refused']} connections refused; {p['recent_ipv4'] + p['recent_ipv6']} distinct in the last minutes"
              + (f"; {p['named_ipv4'] + p['named_ipv6']} addresses allowed by name now"
                 if p['named_ipv4'] + p['named_ipv6'] else ""))
    sys.stdout.flush()
    return 0
