"""The recipient register: who receives data abroad, where they say they process it, and the lawful
basis of each policy's transfers to them.

    recipients/*.yaml   (format: agent/policy/recipients.schema.json; `egress-agent policy schema --recipients`)

Contract:
- `load_recipients(path, policies, jurisdictions, today)` -> (`Register`, warnings). Every problem
  in every file is reported at once as file:line: path: message (UserError, exit 2): schema errors,
  bad patterns, duplicate ids, transfers for unknown policies, and a basis that does not fit the
  declared facts (lints below). Time-dependent findings (a basis expired, or expiring within
  EXPIRY_WARNING_DAYS) are warnings: a register must not stop loading because a day passed.
- `Register.match(hostname, asn, address)` -> the `Recipient` a flow goes to, or None: by host
  name first (every recipient's patterns), then by ASN, then by network; the first recipient in
  file order wins within each kind.

Lints (what the register itself gets wrong):
- PIPL (policies whose home is CN or CN-MAINLAND): a standard contract, certification or exemption
  needs a CAC security assessment instead when the exporter operates critical information
  infrastructure, or declares more than 1,000,000 individuals a year, more than 10,000 with
  sensitive personal information, or important data (CAC Provisions on Promoting and Regulating
  Cross-Border Data Flows, 2024, arts. 7-8); `exempt-under-threshold` needs fewer than 100,000
  individuals a year and no sensitive personal information (art. 5(6)); a standard contract needs
  its filing number. GDPR bases are refused on PIPL policies and PIPL bases on the others
  (certification exists under both).
- GDPR: `dpf` (EU-US Data Privacy Framework) only for a recipient established in the US; `scc`
  needs its module; `derogation` names the art. 49(1) point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

from agent import yamlio
from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import _asns, _day, _nets, _plain, _Problems
from agent.policy.model import Destinations
from agent.schemacheck import schema_errors

SCHEMA_PATH = Path(__file__).with_name("recipients.schema.json")
EXPIRY_WARNING_DAYS = 60
PIPL_HOMES = {"CN", "CN-MAINLAND"}
PIPL_BASES = {"security-assessment", "standard-contract", "certification", "exempt-contract-necessity",
              "exempt-hr-management", "exempt-emergency", "exempt-under-threshold"}
GDPR_BASES = {"adequacy", "dpf", "scc", "bcr", "derogation", "certification"}
SCC_MODULES = {1: "controller to controller", 2: "controller to processor", 3: "processor to processor",
               4: "processor to controller"}


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@dataclass(frozen=True, slots=True)
class Transfer:
    policy: str
    basis: str
    reference: str
    owner: str
    expires: date  # exclusive
    start: date | None = None
    module: int | None = None
    filing_number: str | None = None
    derogation: str | None = None
    declared: dict = field(default_factory=dict)

    def in_force(self, at: date) -> bool:
        return (self.start is None or self.start <= at) and at < self.expires

    def words(self) -> str:
        """The basis as a person names it."""
        b = self.basis
        if b == "scc":
            return f"SCC module {self.module} ({SCC_MODULES.get(self.module, '?')})"
        if b == "dpf":
            return "EU-US Data Privacy Framework certification"
        if b == "derogation":
            return f"GDPR art. 49 derogation ({self.derogation})"
        if b == "standard-contract":
            return f"PIPL standard contract (filing {self.filing_number})"
        if b == "security-assessment":
            return "CAC security assessment"
        if b.startswith("exempt-"):
            return "exemption under the 2024 CAC Provisions (" + b[len("exempt-"):].replace("-", " ") + ")"
        return {"bcr": "binding corporate rules", "adequacy": "adequacy decision"}.get(b, b)


@dataclass(frozen=True, slots=True)
class Recipient:
    id: str
    name: str
    role: str
    established_in: str
    processing_locations: tuple[str, ...]
    match: Destinations
    transfers: tuple[Transfer, ...] = ()
    file: str = ""

    def transfers_for(self, policy: str) -> tuple[Transfer, ...]:
        return tuple(t for t in self.transfers if t.policy == policy)

    def words(self) -> str:
        return f"{self.name} ({self.role}, established in {self.established_in})"


class Register:
    def __init__(self, recipients: list[Recipient]):
        self.recipients = recipients
        self.by_id = {r.id: r for r in recipients}

    def __len__(self) -> int:
        return len(self.recipients)

    def match(self, hostname: str | None, asn: int | None, address) -> Recipient | None:
        return self.match_how(hostname, asn, address)[0]

    def match_how(self, hostname: str | None, asn: int | None, address) -> tuple[Recipient | None, str | None]:
        """(the recipient, how it matched: "hostname", "asn" or "network"), or (None, None)."""
        if hostname:
            for r in self.recipients:
                if any(p.matches(hostname) for p in r.match.hostnames):
                    return r, "hostname"
        if asn is not None:
            for r in self.recipients:
                if asn in r.match.asns:
                    return r, "asn"
        for r in self.recipients:
            for net in r.match.networks:
                if net.version == address.version and address in net:
                    return r, "network"
        return None, None


def register_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
    return [path]


def load_recipients(path, policies, jur: Jurisdictions, today: date) -> tuple[Register, list[str]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such recipient register file or folder")
    by_policy = {p.name: p for p in policies}
    problems: list[str] = []
    warnings: list[str] = []
    recipients: list[Recipient] = []
    seen: dict[str, str] = {}
    for f in register_files(path):
        data, lines, _raw = yamlio.load_file(f, "recipient register")
        data = _plain(data)
        probs = _Problems(str(f), lines)
        if not isinstance(data, dict):
            probs.add((), "a register file holds one mapping (version, recipients)")
            problems.extend(probs.items)
            continue
        for err in sorted(schema_errors(schema(), data), key=lambda e: list(map(str, e.absolute_path))):
            probs.add(tuple(err.absolute_path), err.message)
        if probs.items:
            problems.extend(probs.items)
            continue
        for i, d in enumerate(data["recipients"]):
            r = _recipient(d, ("recipients", i), probs, by_policy, today, warnings, str(f))
            if d["id"] in seen:
                probs.add(("recipients", i, "id"), f"recipient '{d['id']}' is already defined in {seen[d['id']]}")
            seen[d["id"]] = str(f)
            recipients.append(r)
        problems.extend(probs.items)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the recipient register at {path}", problems)
    return Register(recipients), warnings


def _recipient(d, path, probs: _Problems, by_policy: dict, today: date, warnings: list, file: str) -> Recipient:
    from agent.names.hostnames import Pattern

    m = d["match"]
    patterns = []
    for k, h in enumerate(m.get("hostnames") or ()):
        try:
            patterns.append(Pattern(h))
        except ValueError as e:
            probs.add(path + ("match", "hostnames", k), f"bad hostname pattern: {e}")
    match = Destinations(hostnames=tuple(patterns), asns=_asns(m.get("asns"), path + ("match", "asns"), probs),
                         networks=_nets(m.get("networks"), path + ("match", "networks"), probs))
    transfers = []
    for k, t in enumerate(d.get("transfers") or ()):
        tp = path + ("transfers", k)
        start, expires = _day(t.get("from"), tp + ("from",), probs), _day(t["expires"], tp + ("expires",), probs)
        tr = Transfer(t["policy"], t["basis"], t["reference"], t["owner"], expires or date.min, start,
                      t.get("module"), t.get("filing_number"), t.get("derogation"), t.get("declared") or {})
        transfers.append(tr)
        for message in _lint(d, tr, by_policy.get(t["policy"])):
            probs.add(tp + ("basis",), message)
        if start and expires and expires <= start:
            probs.add(tp + ("expires",), f"expires {expires} is not after from {start}")
        if expires and expires <= today:
            warnings.append(f"{probs.file}: recipient {d['id']}: {t['basis']} for policy {t['policy']} expired "
                            f"{expires} (it covered until {expires - timedelta(days=1)}); flows to it are not covered")
        elif expires and (expires - today).days <= EXPIRY_WARNING_DAYS:
            warnings.append(f"{probs.file}: recipient {d['id']}: {t['basis']} for policy {t['policy']} expires "
                            f"{expires}, in {(expires - today).days} days")
    return Recipient(d["id"], d["name"], d["role"], d["established_in"], tuple(d["processing_locations"]),
                     match, tuple(transfers), file)


def _lint(d: dict, t: Transfer, policy) -> list[str]:
    if policy is None:
        return [f"transfer for policy '{t.policy}', which is not loaded"]
    out = []
    pipl = bool(set(policy.home) & PIPL_HOMES)
    if pipl and t.basis not in PIPL_BASES:
        out.append(f"'{t.basis}' is not a PIPL basis (policy {policy.name} protects {', '.join(policy.home)} data)")
    if not pipl and t.basis not in GDPR_BASES:
        out.append(f"'{t.basis}' is a PIPL basis; policy {policy.name} is not a PIPL policy")
    dec = t.declared
    people, sensitive = dec.get("individuals_per_year", 0), dec.get("sensitive_individuals_per_year", 0)
    cats = set(dec.get("data_categories") or ())
    if pipl and t.basis != "security-assessment":
        why = []
        if dec.get("critical_information_infrastructure"):
            why.append("the exporter operates critical information infrastructure")
        if people > 1_000_000:
            why.append(f"{people:,} individuals a year (more than 1,000,000)")
        if sensitive > 10_000:
            why.append(f"sensitive personal information of {sensitive:,} individuals a year (more than 10,000)")
        if "important" in cats:
            why.append("important data")
        if why:
            out.append(f"{t.basis} does not fit the declared facts: {'; '.join(why)} needs a CAC security "
                       "assessment")
    if t.basis == "exempt-under-threshold" and (people >= 100_000 or sensitive or "sensitive" in cats):
        out.append("exempt-under-threshold needs fewer than 100,000 individuals a year and no sensitive personal "
                   f"information (declared: {people:,} individuals, {sensitive:,} with sensitive information)")
    if t.basis == "standard-contract" and not t.filing_number:
        out.append("a PIPL standard contract needs its filing_number")
    if t.basis == "dpf" and d["established_in"] != "US":
        out.append(f"the Data Privacy Framework certifies US organisations; {d['name']} is established in "
                   f"{d['established_in']}")
    if t.basis == "scc" and t.module is None:
        out.append("scc needs its module (1-4)")
    if t.basis == "derogation" and not t.derogation:
        out.append("derogation needs the art. 49(1) point relied on (derogation: consent, contract, ...)")
    return out


@lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList

    # ICANN section only: `s3.eu-central-1.amazonaws.com` belongs to amazonaws.com (the operator), not
    # to a private suffix of its own
    return PublicSuffixList(only_icann=True)


@lru_cache(maxsize=65536)
def registrable(name: str) -> str:
    """The registrable domain of a host name (`www.bbc.co.uk` -> `bbc.co.uk`), by the Public Suffix
    List the `publicsuffixlist` package ships; the name itself when it has none (`localhost`)."""
    return _psl().privatesuffix(name, accept_unknown=True) or name


def fallback_recipient(flow, loc) -> str:
    """Who received a flow that no recipient of the register matched, as far as we know: the host
    name's registrable domain (`host:payroll.example`, `host:bbc.co.uk`), else the network operator
    (`AS64500 Example Org`), else `unknown`. A key for inventories and logs, never a metric label."""
    if flow.hostname and not flow.hostname[-1:].isdigit():
        return "host:" + registrable(flow.hostname)
    if loc.asn is not None:
        return f"AS{loc.asn}" + (f" {loc.as_org}" if loc.as_org else "")
    return "unknown"
