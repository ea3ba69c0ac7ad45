"""Load policies from YAML: schema first, then meaning; every problem reported, with file:line and path.

Contract: `load_policies(path, jurisdictions)` takes a file or a folder (every `*.yaml`/`*.yml`
that is not a `*.test.yaml`) and returns the policies sorted by name, or raises one UserError that
lists *all* problems found in all files, e.g.
`policies/eu.yaml:12: allow.jurisdictions[2]: unknown jurisdiction 'EUU' (did you mean 'EU'?)`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from datetime import date
from functools import lru_cache
from pathlib import Path

from agent import yamlio
from agent.errors import UserError
from agent.flow import PROTO_NUMBERS
from agent.names.hostnames import Pattern
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.model import Destinations, Exemption, Operator, Policy, Selector
from agent.schemacheck import schema_errors

SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _plain(value):
    """YAML dates -> ISO strings, so the JSON Schema sees what a JSON editor would."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, date):
        return value.isoformat()
    return value


def policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.suffix in (".yaml", ".yml") and not p.name.endswith((".test.yaml", ".test.yml")))
    return [path]


class _Problems:
    def __init__(self, file: str, lines: dict):
        self.file, self.lines, self.items = file, lines, []

    def add(self, path, message: str):
        line = yamlio.line_of(self.lines, path)
        where = f"{self.file}:{line}" if line else self.file
        self.items.append(f"{where}: {yamlio.dotted(path)}: {message}")


def load_policies(path, jurisdictions: Jurisdictions) -> list[Policy]:
    path = Path(path)
    try:
        if not path.exists():
            raise UserError(f"{path}: no such policy file or folder")
        files = policy_files(path)
    except OSError as e:  # a folder this user may not enter or list
        raise UserError(f"{path}: cannot read the policies ({e.strerror or e})") from None
    problems: list[str] = []
    policies: list[Policy] = []
    for f in files:
        try:
            pol, errs = _load_file(f, jurisdictions)
        except UserError as e:
            problems.append(str(e))
            continue
        problems.extend(errs)
        if pol is not None:
            policies.append(pol)
    seen: dict[str, str] = {}
    for p in policies:
        if p.name in seen:
            problems.append(f"{p.file}: name: policy '{p.name}' is already defined in {seen[p.name]}")
        seen[p.name] = p.file
    if problems:
        raise UserError(f"{len(problems)} problem(s) in policies at {path}", problems)
    if not policies:
        raise UserError(f"{path}: no policy files (*.yaml) found")
    return sorted(policies, key=lambda p: p.name)


def _load_file(f: Path, jur: Jurisdictions) -> tuple[Policy | None, list[str]]:
    data, lines, raw = yamlio.load_file(f, "policy")
    data = _plain(data)
    probs = _Problems(str(f), lines)
    if not isinstance(data, dict):
        probs.add((), "a policy file holds one mapping (version, name, home, ...)")
        return None, probs.items
    bad_paths = []
    for err in sorted(schema_errors(schema(), data), key=lambda e: list(map(str, e.absolute_path))):
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            # at the key's own line, not the mapping's: one problem per unexpected key
            known = set(err.schema.get("properties", {}))
            for key in (k for k in err.instance if k not in known):
                probs.add(path + (key,), f"unknown key '{key}'")
                bad_paths.append(path + (key,))
            continue
        probs.add(path, err.message)
        bad_paths.append(path)
    if probs.items:
        # Report the semantic problems too (an unknown jurisdiction, a /33), not only the first
        # kind found: check a copy without the values the schema refused, and keep what it finds.
        try:
            _build(_without(data, bad_paths), jur, probs, str(f), "")
        except (KeyError, TypeError, AttributeError, ValueError, IndexError):
            pass  # too broken to check further; the schema's problems stand
        return None, probs.items
    pol = _build(data, jur, probs, str(f), hashlib.sha256(raw).hexdigest())
    return (pol if not probs.items else None), probs.items


def _without(data, paths) -> dict:
    """A deep copy of `data` with the values at `paths` removed (the schema's refusals), so the
    semantic checks can run on what is left."""
    import copy

    out = copy.deepcopy(data)
    for path in sorted(paths, key=len, reverse=True):
        if not path:
            continue
        node = out
        try:
            for k in path[:-1]:
                node = node[k]
            if isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
                node[path[-1]] = None
        except (KeyError, IndexError, TypeError):
            continue
    return out


def _jurs(values, path, jur: Jurisdictions, probs: _Problems, home=()) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values or ()):
        if v == "HOME":
            if not home:
                probs.add(path + (i,), "HOME is only meaningful where the policy's home is known")
            out.extend(home)
        elif not jur.known(v):
            hint = jur.suggest(v)
            probs.add(path + (i,), f"unknown jurisdiction '{v}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        else:
            out.append(v)
    return tuple(dict.fromkeys(out))


def _nets(values, path, probs) -> tuple:
    out = []
    for i, v in enumerate(values or ()):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            probs.add(path + (i,), f"'{v}' is not an IP network (CIDR)")
    return tuple(out)


def _asn(v) -> int:
    """The schema admits 0-4294967295 or AS + up to 10 digits; the latter is range-checked in _asns."""
    return int(v[2:]) if isinstance(v, str) else int(v)


def _asns(values, path, probs) -> frozenset:
    out = set()
    for i, a in enumerate(values or ()):
        n = _asn(a)
        if n > 0xFFFFFFFF:
            probs.add(path + (i,), f"'{a}' is not an AS number (0 to 4294967295)")
        out.add(n)
    return frozenset(out)


def _dest(d, path, jur, probs, home) -> Destinations | None:
    if d is None:
        return None
    patterns = []
    for i, h in enumerate(d.get("hostnames") or ()):
        try:
            patterns.append(Pattern(h))
        except ValueError as e:
            probs.add(path + ("hostnames", i), f"bad hostname pattern: {e}")
    return Destinations(
        jurisdictions=_jurs(d.get("jurisdictions"), path + ("jurisdictions",), jur, probs, home),
        networks=_nets(d.get("networks"), path + ("networks",), probs),
        asns=_asns(d.get("asns"), path + ("asns",), probs),
        hostnames=tuple(patterns),
        operator_jurisdictions=_jurs(d.get("operator_jurisdictions"), path + ("operator_jurisdictions",),
                                     jur, probs, home),
    )


def _build(d: dict, jur: Jurisdictions, probs: _Problems, file: str, sha: str) -> Policy:
    home = _jurs(d["home"], ("home",), jur, probs)
    sel = d.get("applies_to") or {}
    ports = []
    for i, p in enumerate(sel.get("ports") or ()):
        lo, _, hi = str(p).partition("-")
        lo, hi = int(lo), int(hi or lo)
        if not (0 <= lo <= hi <= 65535):
            probs.add(("applies_to", "ports", i), f"port range '{p}' must be low-high within 0-65535")
        ports.append((lo, hi))
    selector = Selector(
        sources=_nets(sel.get("sources"), ("applies_to", "sources"), probs),
        ports=tuple(ports),
        protocols=frozenset(PROTO_NUMBERS[p] for p in sel.get("protocols") or ()),
        processes=frozenset(sel.get("processes") or ()),
        users=frozenset(str(u) for u in sel.get("users") or ()),
        units=frozenset(sel.get("units") or ()),
        containers=frozenset(sel.get("containers") or ()),
    )
    operators: dict[int, Operator] = {}
    for i, op in enumerate(d.get("operators") or ()):
        j = _jurs([op["jurisdiction"]], ("operators", i, "jurisdiction"), jur, probs)
        for k, a in enumerate(op["asns"]):
            asn = _asn(a)
            if asn > 0xFFFFFFFF:
                probs.add(("operators", i, "asns", k), f"'{a}' is not an AS number (0 to 4294967295)")
            elif asn in operators:
                probs.add(("operators", i, "asns", k), f"AS{asn} is already listed for {operators[asn].name}")
            operators[asn] = Operator(op["name"], j[0] if j else op["jurisdiction"])
    allow = _dest(d.get("allow"), ("allow",), jur, probs, home)
    deny = _dest(d.get("deny"), ("deny",), jur, probs, home)
    if not allow and not deny:
        probs.add(("allow",), "a policy needs allow or deny destinations, or it can never be violated")
    if deny and deny.operator_jurisdictions and not operators:
        probs.add(("deny", "operator_jurisdictions"), "needs an 'operators' list mapping ASNs to jurisdictions")
    exceptions = []
    seen_ids = set()
    for i, e in enumerate(d.get("exceptions") or ()):
        path = ("exceptions", i)
        if e["id"] in seen_ids:
            probs.add(path + ("id",), f"exception id '{e['id']}' is used twice")
        seen_ids.add(e["id"])
        dest = _dest(e["destinations"], path + ("destinations",), jur, probs, home)
        if not dest:
            probs.add(path + ("destinations",), "an exception must name at least one destination")
        start = _day(e.get("from"), path + ("from",), probs)
        expires = _day(e["expires"], path + ("expires",), probs)
        if start and expires and expires <= start:
            probs.add(path + ("expires",), f"expires {expires} is not after from {start}")
        exceptions.append(Exemption(e["id"], e["basis"], e["reference"], e["owner"], dest or Destinations(),
                                    expires or date.min, start))
    if d.get("enforce") == "refuse":
        for key in ("processes", "units", "containers"):
            if (d.get("applies_to") or {}).get(key):
                probs.add(("applies_to", key), f"a policy with enforce: refuse cannot select by {key}: the kernel "
                                               "refuses a connection before any process is known to the agent "
                                               "(select by sources, ports, protocols or users, or use dry-run)")
    eff = d.get("effective") or {}
    eff_from = _day(eff.get("from"), ("effective", "from"), probs)
    eff_until = _day(eff.get("until"), ("effective", "until"), probs)
    if eff_from and eff_until and eff_until <= eff_from:
        probs.add(("effective", "until"), f"until {eff_until} is not after from {eff_from}")
    return Policy(name=d["name"], home=home, severity=d.get("severity", "medium"),
                  description=d.get("description", ""), applies_to=selector, allow=allow, deny=deny,
                  operators=operators, unknown=d.get("unknown", "indeterminate"),
                  use_represented_country=d.get("location") == "represented",
                  registration_as_location=bool(d.get("registration_as_location", False)),
                  names_override_location=bool(d.get("names_override_location", False)),
                  trust_names=tuple(d["trust_names"]) if d.get("trust_names") is not None else None,
                  recipient_location=d.get("recipient_location", "observed"),
                  enforce=d.get("enforce", "observe"),
                  directions=tuple(d.get("directions") or ("outbound",)),
                  exceptions=tuple(exceptions), file=file, sha256=sha,
                  effective_from=eff_from, effective_until=eff_until)


def _day(v, path, probs) -> date | None:
    if v is None:
        return None
    try:
        return date.fromisoformat(v)
    except ValueError:
        probs.add(path, f"'{v}' is not a calendar date")
        return None
