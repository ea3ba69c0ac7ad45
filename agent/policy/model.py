"""Policy records as the engine sees them: validated, parsed, frozen.

Only `load.py` builds these; `engine.py` reads them. Networks are parsed `ipaddress` objects, ASNs
are ints, dates are `datetime.date`, and `HOME` in a jurisdiction list is already replaced by the
policy's home jurisdictions.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import date

from agent.names.hostnames import Pattern

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


NAME_SOURCES = frozenset({"dns", "sni", "quic-sni"})
ENFORCE_MODES = ("observe", "dry-run", "refuse")  # in order: the host's switch caps a policy's mode


def effective_mode(policy_mode: str, switch: str) -> str:
    """A policy's `enforce` capped by the host's switch (observe < dry-run < refuse)."""
    return ENFORCE_MODES[min(ENFORCE_MODES.index(policy_mode), ENFORCE_MODES.index(switch))]


@dataclass(frozen=True, slots=True)
class Destinations:
    jurisdictions: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    asns: frozenset[int] = frozenset()
    hostnames: tuple[Pattern, ...] = ()  # exact names and *.suffix patterns (agent.names.hostnames)
    operator_jurisdictions: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.jurisdictions or self.networks or self.asns or self.hostnames
                    or self.operator_jurisdictions)


@dataclass(frozen=True, slots=True)
class Selector:
    sources: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    protocols: frozenset[int] = frozenset()
    processes: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    units: frozenset[str] = frozenset()
    containers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Exemption:
    """A policy exception with a lawful basis. Named Exemption to keep clear of Python's Exception."""

    id: str
    basis: str
    reference: str
    owner: str
    destinations: Destinations
    expires: date  # exclusive: the first day it no longer exempts
    start: date | None = None

    def in_force(self, at: date) -> bool:
        return (self.start is None or self.start <= at) and at < self.expires


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    jurisdiction: str


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    home: tuple[str, ...]
    severity: str = "medium"
    description: str = ""
    applies_to: Selector = field(default_factory=Selector)
    allow: Destinations | None = None
    deny: Destinations | None = None
    operators: dict[int, Operator] = field(default_factory=dict)
    unknown: str = "indeterminate"
    exceptions: tuple[Exemption, ...] = ()
    file: str = ""
    sha256: str = ""
    directions: tuple[str, ...] = ("outbound",)  # outbound: local -> abroad; inbound: abroad -> local
    use_represented_country: bool = False  # judge by GeoIP represented_country where it differs
    registration_as_location: bool = False  # without a GeoIP database, judge by the country of registration
    names_override_location: bool = False  # a name matching allow decides, whatever the address's location
    # which name sources may excuse (make compliant through `allow`, exempt through an exception):
    # None is the default, none unless names_override_location (then all); a name in `deny` always counts
    trust_names: tuple[str, ...] | None = None

    def trusted_name_sources(self) -> frozenset:
        if self.trust_names is not None:
            return frozenset(self.trust_names)
        return NAME_SOURCES if self.names_override_location else frozenset()
    recipient_location: str = "observed"  # observed | declared | both: which location of a known recipient counts
    enforce: str = "observe"  # observe | dry-run | refuse (agent.enforce; capped by the host's switch)
    effective_from: date | None = None   # first day the rules apply (the law's date of application)
    effective_until: date | None = None  # first day they no longer apply (exclusive)

    def in_effect(self, at: date) -> bool:
        return (self.effective_from is None or self.effective_from <= at) and \
            (self.effective_until is None or at < self.effective_until)
