"""Jurisdiction groups (EU, EEA, EU-ADEQUATE, ...) as dated data, and ISO 3166-1 country codes.

Contract: `Jurisdictions.load()` reads every `*.yaml` in `jurisdictions/` (plus extra folders).
`membership(group, country, at)` answers at a date, so an audit of an old capture is judged by the
rules of its day (GB is in EU until 2020-01-31). A plain ISO code is a jurisdiction of one country.
Entries with a `condition` are returned with it; callers decide what a condition means.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from agent import yamlio
from agent.errors import UserError

ISO3166 = frozenset("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV
BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES
ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE
IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU
NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM
SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE
VG VI VN VU WF WS YE YT ZA ZM ZW XK
""".split())  # XK: Kosovo, user-assigned but used by GeoIP vendors

DATA_DIR = Path(__file__).with_name("jurisdictions")


@dataclass(frozen=True, slots=True)
class Member:
    country: str
    start: date
    end: date | None  # exclusive
    source: str
    condition: str | None = None  # must be shown of the recipient: never allows a flow on its own
    excludes: str | None = None   # sectors or purposes the decision leaves out: allowed, and named

    def in_force(self, at: date) -> bool:
        return self.start <= at and (self.end is None or at < self.end)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    title: str
    source: str
    members: tuple[Member, ...]
    include: tuple[str, ...]
    file: str
    reviewed: date | None = None  # when someone last checked every entry against its source
    include_from: tuple[tuple[str, date], ...] = ()  # a country counts through `include` only from a date
    # dated facts about a member that do not change membership (country, day, what, source): the day
    # the EEA Agreement itself reached Croatia, beside its membership through the EU from accession
    facts: tuple[tuple[str, date, str, str], ...] = ()


def _date(value, where: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise UserError(f"{where}: '{value}' is not a date (YYYY-MM-DD)") from None


class Jurisdictions:
    def __init__(self, groups: dict[str, Group]):
        self.groups = groups
        self._cache: dict[tuple, Member | None] = {}

    @classmethod
    def load(cls, extra_dirs=()) -> Jurisdictions:
        groups: dict[str, Group] = {}
        problems: list[str] = []
        for folder in (DATA_DIR, *map(Path, extra_dirs)):
            for path in sorted(folder.glob("*.yaml")):
                try:
                    g = _load_group(path)
                except UserError as e:
                    problems.append(str(e))
                    continue
                if g.name in groups:
                    problems.append(f"{path}: group {g.name} is defined again (first in {groups[g.name].file})")
                groups[g.name] = g
        for g in groups.values():
            for inc in g.include:
                if inc not in groups:
                    problems.append(f"{g.file}: include: unknown group '{inc}'")
        if problems:
            raise UserError("jurisdiction data is invalid", problems)
        return cls(groups)

    def known(self, name: str) -> bool:
        return name in self.groups or name in ISO3166

    def suggest(self, name: str) -> str | None:
        names = list(self.groups) + sorted(ISO3166)
        close = difflib.get_close_matches(name.upper(), names, n=1, cutoff=0.6)
        return close[0] if close else None

    def membership(self, name: str, country: str, at: date) -> Member | None:
        """The entry that puts `country` in `name` at `at`; an unconditional one wins. Cached."""
        key = (name, country, at)
        try:
            return self._cache[key]
        except KeyError:
            pass
        if len(self._cache) > 100_000:
            self._cache.clear()
        m = self._cache[key] = self._membership(name, country, at)
        return m

    def _membership(self, name: str, country: str, at: date, _seen=()) -> Member | None:
        if name in ISO3166:
            return Member(country, date.min, None, "ISO 3166-1") if country == name else None
        g = self.groups.get(name)
        if g is None or name in _seen:
            return None
        found = None
        for m in g.members:
            if m.country == country and m.in_force(at):
                if m.condition is None:
                    return m
                found = found or m
        later = dict(g.include_from).get(country)
        for inc in g.include if later is None or at >= later else ():
            m = self._membership(inc, country, at, _seen + (name,))
            if m is not None and m.condition is None:
                return m
            found = found or m
        return found

    def groups_of(self, country: str | None, at: date) -> list[str]:
        """Names of the groups `country` belongs to (unconditionally) at `at`."""
        if not country:
            return []
        out = []
        for name in sorted(self.groups):
            m = self.membership(name, country, at)
            if m is not None and m.condition is None:
                out.append(name)
        return out


def _load_group(path: Path) -> Group:
    # the shipped files are part of the program: parsed by libyaml; a user's folder by the bounded loader
    doc = yamlio.load_shipped(path) if path.parent == DATA_DIR else yamlio.load_file(path, "jurisdiction group")[0]
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise UserError(f"{path}: a jurisdiction group needs a 'name'")
    members = []
    for i, m in enumerate(doc.get("members") or []):
        where = f"{path}: members[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{where}: expected a mapping")
        cc = str(m.get("country", "")).upper()
        if cc not in ISO3166:
            raise UserError(f"{where}.country: '{cc}' is not an ISO 3166-1 alpha-2 code")
        if not m.get("source"):
            raise UserError(f"{where}.source: every entry cites its source")
        members.append(Member(cc, _date(m.get("from"), f"{where}.from"),
                              _date(m["until"], f"{where}.until") if m.get("until") else None,
                              str(m["source"]), m.get("condition"), m.get("excludes")))
    if not doc.get("reviewed"):
        raise UserError(f"{path}: reviewed: every group file says when its entries were last checked "
                        "against their sources (YYYY-MM-DD)")
    include_from = []
    for cc, spec in (doc.get("include_from") or {}).items():
        where = f"{path}: include_from.{cc}"
        if str(cc).upper() not in ISO3166 or not isinstance(spec, dict) or not spec.get("source"):
            raise UserError(f"{where}: an ISO country code mapping to {{from: DATE, source: ...}}")
        include_from.append((str(cc).upper(), _date(spec.get("from"), f"{where}.from")))
    facts = []
    for cc, spec in (doc.get("facts") or {}).items():
        where = f"{path}: facts.{cc}"
        if str(cc).upper() not in ISO3166 or not isinstance(spec, dict) or not spec.get("source") or \
                not isinstance(spec.get("what"), str):
            raise UserError(f"{where}: an ISO country code mapping to {{date: DATE, what: TEXT, source: ...}}")
        facts.append((str(cc).upper(), _date(spec.get("date"), f"{where}.date"), spec["what"], str(spec["source"])))
    return Group(doc["name"], doc.get("title", ""), doc.get("source", ""), tuple(members),
                 tuple(doc.get("include") or ()), str(path), _date(doc["reviewed"], f"{path}: reviewed"),
                 tuple(include_from), tuple(facts))
