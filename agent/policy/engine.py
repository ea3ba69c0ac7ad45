"""The policy engine: one pure function from (flow, location, policy) to a verdict.

Contract: `evaluate(flow, loc, policy, jurisdictions) -> Verdict`, no I/O, no clock: the flow's own
first-seen time decides which jurisdiction memberships and exceptions were in force. The daemon,
the audit and `policy test` all call this one function (through `agent.judge.pipeline`).

Order of judgement:
1. not public, or not selected by `applies_to`             -> not_applicable
2. `deny` matches                                           -> violation
3. `allow` matches (network, ASN, hostname, jurisdiction)   -> compliant
4. the facts needed are unknown (no country, no operator)   -> per `unknown`: indeterminate (default),
                                                               violation, or compliant
5. otherwise                                                -> violation
A violation or indeterminate verdict becomes `exempt` when an exception in force covers the
destination; an expired exception that would have covered it is named in the message.
"""

from __future__ import annotations

import ipaddress
from datetime import date, timedelta
from functools import lru_cache

from agent.flow import Flow, Location, Outcome, Verdict
from agent.names.hostnames import SOURCE_WORDS, display
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.model import Destinations, Policy, Selector


@lru_cache(maxsize=65536)
def _ip(text: str):
    """Parsed address, cached: every policy of every flow asks again for the same few addresses."""
    return ipaddress.ip_address(text)


_EPOCH = date(1970, 1, 1)


@lru_cache(maxsize=4096)
def _day(index: int) -> date:
    return _EPOCH + timedelta(days=index)


def flow_day(flow: Flow) -> date:
    """The UTC day of the flow's first packet (memberships change at UTC midnight)."""
    return _day(int((flow.first_seen or 0.0) // 86400))


def _selected(sel: Selector, flow: Flow) -> bool:
    if sel.protocols and flow.proto not in sel.protocols:
        return False
    if sel.ports and not any(lo <= flow.dport <= hi for lo, hi in sel.ports):
        return False
    if sel.sources:
        src = _ip(flow.src)
        if not any(src in n for n in sel.sources if n.version == src.version):
            return False
    if sel.processes or sel.users or sel.units or sel.containers:
        who = flow.who
        if who is None:
            return False  # a source without attribution cannot show the selector matches
        if sel.processes and not ({who.comm, who.exe, (who.exe or "").rsplit("/", 1)[-1]} & sel.processes):
            return False
        if sel.users and not ({str(who.uid), who.user} & sel.users):
            return False
        if sel.units and who.unit not in sel.units:
            return False
        if sel.containers and not (who.container and any(who.container.startswith(c) for c in sel.containers)):
            return False
    return True


class _Match:
    __slots__ = ("hit", "unknown", "conditional")

    def __init__(self):
        self.hit: str | None = None
        self.unknown: str | None = None
        self.conditional: str | None = None


def _source_words(source: str | None) -> str:
    return SOURCE_WORDS.get(source) or (f"from {source}" if source else "from the flow log")


def _name_hit(dest: Destinations | None, host: str | None) -> bool:
    return bool(host and dest is not None and dest.hostnames and any(p.matches(host) for p in dest.hostnames))


def _match(dest: Destinations, flow: Flow, loc: Location, country: str | None, policy: Policy,
           jur: Jurisdictions, at: date, host: str | None = None) -> _Match:
    m = _Match()
    addr = _ip(flow.dst)
    for net in dest.networks:
        if net.version == addr.version and addr in net:
            m.hit = f"network {net}"
            return m
    if loc.asn is not None and loc.asn in dest.asns:
        m.hit = f"AS{loc.asn}"
        return m
    if _name_hit(dest, host):
        m.hit = f"hostname {next(p for p in dest.hostnames if p.matches(host))}"
        return m
    if dest.jurisdictions:
        if country is None:
            m.unknown = f"unknown-location:{loc.unknown_reason or 'no-record'}"
        else:
            for j in dest.jurisdictions:
                mem = jur.membership(j, country, at)
                if mem is None:
                    continue
                if mem.condition is None:
                    # a decision with carve-outs still covers the country: name them for the reader
                    m.hit = f"{j} (the decision excludes {mem.excludes})" if mem.excludes else j
                    return m
                m.conditional = m.conditional or f"{country} counts as {j} only when the {mem.condition}"
    if dest.operator_jurisdictions:
        if loc.asn is None:
            m.unknown = m.unknown or "unknown-operator:no-asn"
        else:
            op = policy.operators.get(loc.asn)
            if op is None:
                m.unknown = m.unknown or "unknown-operator:unlisted-asn"
            else:
                for j in dest.operator_jurisdictions:
                    if op.jurisdiction == j or jur.membership(j, op.jurisdiction, at) is not None:
                        m.hit = f"operator {op.name} (AS{loc.asn}) under {op.jurisdiction}"
                        return m
    return m


# What each unknown reason means, in words (reason codes stay machine-readable in `reason`).
UNKNOWN_WORDS = {
    "no-record": "no location data for this address",
    "registered-country-only": "only the country the address is registered to is known, not where it is",
    "continent-only": "only the continent is known",
    "anycast": "an anycast address, served from many countries",
    "database-error": "the GeoIP database could not be read for this address",
    "not-public": "not a public address",
    "no-asn": "no network operator (ASN) is known for this address",
    "unlisted-asn": "the network operator (ASN) is not in the policy's operator list",
}
PROBLEM_WORDS = {"denied-destination": "denied", "outside-allowed": "outside the allowed destinations"}


def _unknown_words(code: str) -> str:
    kind, _, why = code.partition(":")
    return UNKNOWN_WORDS.get(why, why.replace("-", " "))


def _where(loc: Location, country: str | None) -> str:
    if country:
        return country
    where = f"location unknown: {_unknown_words(':' + (loc.unknown_reason or 'no-record'))}"
    if loc.registered_country:
        where += f"; registered {loc.registered_country}"
    elif loc.continent:
        where += f"; continent {loc.continent}"
    return where


def peer_prefix(peer: str, inbound: bool = False, hostname: str | None = None, source: str | None = None) -> str:
    """How every description of the remote peer begins: "destination ADDR (" plus, for an outbound
    flow with a name, "NAME, from TLS SNI; ". `Judged` swaps it to reuse a cached message. An
    inbound flow's name (its SNI) is the local service's, not the peer's, so it is left out."""
    if hostname and not inbound:
        how = SOURCE_WORDS.get(source or "", f"from {source or 'the flow record'}")
        return f"{PEER_NOUN[False]} {peer} ({display(hostname)}, {how}; "
    return f"{PEER_NOUN[inbound]} {peer} ("


def _describe(flow: Flow, loc: Location, country: str | None, inbound: bool = False, where: str | None = None) -> str:
    """`flow` as the engine sees it: for an inbound flow, dst is the remote peer."""
    where = where if where is not None else _where(loc, country)
    org = f", AS{loc.asn} {loc.as_org}" if loc.asn is not None and loc.as_org else (
        f", AS{loc.asn}" if loc.asn is not None else "")
    via = f"located by its embedded IPv4 address {loc.lookup_ip}: " if loc.lookup_ip else ""
    return f"{peer_prefix(flow.dst, inbound, flow.hostname, flow.hostname_source)}{via}{where}{org})"


PEER_NOUN = {False: "destination", True: "inbound peer"}  # how a message names the remote address


def _last_day(ex) -> date:
    return ex.expires - timedelta(days=1)


def _declared_outside(policy: Policy, rec, jur: Jurisdictions, at: date) -> list[str]:
    """The recipient's declared processing locations that the policy does not allow (or denies)."""
    out = []
    for c in rec.processing_locations:
        denied = policy.deny is not None and any(
            (m := jur.membership(j, c, at)) is not None and m.condition is None for j in policy.deny.jurisdictions)
        allowed = policy.allow is None or any(
            (m := jur.membership(j, c, at)) is not None and m.condition is None for j in policy.allow.jurisdictions)
        if denied or not allowed:
            out.append(c)
    return out


def evaluate(flow: Flow, loc: Location, policy: Policy, jur: Jurisdictions, at: date | None = None,
             inbound: bool = False, recipient=None) -> Verdict:
    """The verdict of `policy` on `flow`, judged as of `at` (default: the flow's first-seen UTC day;
    the pipeline passes another day for flows without a plausible time). Every message ends with
    the day it was judged at, since memberships and exceptions depend on it.

    `recipient`: the register's `Recipient` the flow goes to, if any. Its transfers for this policy
    exempt like exceptions (and are named); with `recipient_location: declared|both` its declared
    processing locations are judged too.

    `inbound`: the connection was opened from the remote peer; `flow` is then given from the local
    side (src the local host, dst the remote peer, dport the local service port), so selectors,
    destinations and exceptions read the same way in both directions."""
    at = at or flow_day(flow)

    def verdict(outcome: Outcome, reason: str, message: str, exception: str | None = None) -> Verdict:
        return Verdict(policy=policy.name, outcome=outcome, reason=reason, message=f"{message} (judged as of {at})",
                       severity=policy.severity, policy_file=policy.file, policy_sha256=policy.sha256,
                       exception=exception)

    if loc.scope != "public":
        return verdict(Outcome.NOT_APPLICABLE, "not-public",
                       f"{PEER_NOUN[inbound]} {flow.dst} is {loc.scope}, not a transfer")
    direction = "inbound" if inbound else "outbound"
    if direction not in policy.directions:
        return verdict(Outcome.NOT_APPLICABLE, f"{direction}-not-governed",
                       f"policy {policy.name} does not judge {direction} connections")
    if not _selected(policy.applies_to, flow):
        return verdict(Outcome.NOT_APPLICABLE, "not-selected", f"flow is not governed by policy {policy.name}")
    if not policy.in_effect(at):
        span = (f"from {policy.effective_from}" if policy.effective_from else "") + \
               (f" until {policy.effective_until} (exclusive)" if policy.effective_until else "")
        return verdict(Outcome.NOT_APPLICABLE, "not-in-effect",
                       f"policy {policy.name} is in effect {span.strip()}, not on {at}")
    country = loc.country if loc.unknown_reason is None else None
    host = None if inbound else flow.hostname
    # A name may always make a verdict worse (deny); it may excuse (allow, exceptions) only when the
    # policy trusts where it came from: a client chooses its SNI, and anyone can send a DNS answer.
    excuse_host = host if host and flow.hostname_source in policy.trusted_name_sources() else None
    desc = _describe(flow, loc, country, inbound)
    if country is None and policy.registration_as_location and loc.unknown_reason == "registered-country-only" \
            and loc.source == "rir-registration" and loc.registered_country:
        # no location database: this policy chose to judge by the country of registration, and says so
        country = loc.registered_country
        desc = _describe(flow, loc, country, inbound,
                         where=f"registered {country}, taken as its location by this policy: no GeoIP location data")
    if policy.names_override_location and _name_hit(policy.allow, excuse_host) and not _name_hit(policy.deny, host):
        # the policy trusts the name over the address (a contractually located endpoint on a CDN)
        return verdict(Outcome.COMPLIANT, "allowed",
                       f"{desc} is named {host}, allowed by policy {policy.name}, whose names override the "
                       "address's location")
    if country and policy.use_represented_country and loc.represented_country \
            and loc.represented_country != country:
        # e.g. a military base abroad: the policy chose to judge by the country the network represents
        desc = _describe(flow, loc, country, inbound,
                         where=f"{loc.represented_country}, represented; located in {country}")
        country = loc.represented_country

    problem: tuple[str, str] | None = None  # (reason, message)
    unknown: str | None = None
    declared_problem = None
    if recipient is not None and policy.recipient_location in ("declared", "both"):
        outside = _declared_outside(policy, recipient, jur, at)
        if outside:
            allowed = ", ".join(policy.allow.jurisdictions) if policy.allow else "the allowed destinations"
            declared_problem = ("outside-allowed", f"{desc} goes to {recipient.words()}, which declares processing "
                                f"in {', '.join(outside)}, outside {allowed} required by policy {policy.name}")
        if policy.recipient_location == "declared":
            if declared_problem is None:
                return verdict(Outcome.COMPLIANT, "allowed",
                               f"{desc} goes to {recipient.words()}, which declares processing in "
                               f"{', '.join(recipient.processing_locations)}, allowed by policy {policy.name} "
                               "(judged by declared locations)")
            problem = declared_problem
    if problem is None and policy.deny:
        m = _match(policy.deny, flow, loc, country, policy, jur, at, host)
        if m.hit:
            problem = ("denied-destination", f"{desc} is in {m.hit}, denied by policy {policy.name}")
        elif m.unknown:
            unknown = m.unknown
    if problem is None and policy.allow:
        m = _match(policy.allow, flow, loc, country, policy, jur, at, excuse_host)
        if m.hit and unknown is None and declared_problem is None:
            trusted = (f" (a name {_source_words(flow.hostname_source)}, "
                       "which this policy trusts)") if m.hit.startswith("hostname ") else ""
            return verdict(Outcome.COMPLIANT, "allowed",
                           f"{desc} is in {m.hit}{trusted}, allowed by policy {policy.name}")
        if m.hit and unknown is None:
            problem = declared_problem  # observed inside, declared outside: both must hold
        if not m.hit:
            if m.unknown:
                unknown = unknown or m.unknown
            else:
                allowed = ", ".join(policy.allow.jurisdictions) or "the allowed destinations"
                msg = f"{desc} is outside {allowed} required by policy {policy.name}"
                if m.conditional:
                    msg += f" ({m.conditional}: record that as an exception)"
                if excuse_host is None and _name_hit(policy.allow, host):
                    msg += f" (its name {display(host)} matches allow, but names " \
                           f"{_source_words(flow.hostname_source)} " \
                           f"do not excuse under this policy: trust_names)"
                problem = ("outside-allowed", msg)
    if problem is None and unknown is None and declared_problem is not None:
        problem = declared_problem
    if problem is None and unknown is None:
        return verdict(Outcome.COMPLIANT, "allowed", f"{desc} is not denied by policy {policy.name}")

    expired = []
    what = (PROBLEM_WORDS.get(problem[0], problem[0]) if problem
            else f"impossible to judge ({_unknown_words(unknown)})")
    if recipient is not None:
        for t in recipient.transfers_for(policy.name):
            if t.in_force(at):
                return verdict(Outcome.EXEMPT, "exception",
                               f"{desc} would be {what} under policy {policy.name}; exempt as a transfer to "
                               f"{recipient.words()} under {t.words()} ({t.reference}; owner {t.owner}; covers until "
                               f"{t.expires - timedelta(days=1)})", exception=f"{recipient.id}:{t.basis}")
            expired.append(f"the {t.basis} of recipient {recipient.id} " + (
                f"expired {t.expires}" if at >= t.expires else f"starts {t.start}"))
    for ex in policy.exceptions:
        em = _match(ex.destinations, flow, loc, country, policy, jur, at, excuse_host)
        if not em.hit:
            continue
        if ex.in_force(at):
            return verdict(Outcome.EXEMPT, "exception",
                           f"{desc} would be {what} under policy {policy.name}; exempt by exception {ex.id} "
                           f"({ex.basis}: {ex.reference}; owner {ex.owner}; covers until {_last_day(ex)})",
                           exception=ex.id)
        expired.append(f"exception {ex.id} " + (f"expired {ex.expires} (it covered until {_last_day(ex)})"
                                                 if at >= ex.expires else f"starts {ex.start}"))
    tail = "; " + ("; ".join(expired) + " (not in force)" if expired else "no exception applies")
    if recipient is not None and not any(t.in_force(at) for t in recipient.transfers_for(policy.name)):
        tail += f"; recipient {recipient.words()} has no basis in force for policy {policy.name}"
    if problem is not None:
        return verdict(Outcome.VIOLATION, problem[0], problem[1] + tail)
    if unknown.startswith("unknown-location"):  # the description already says what is missing
        msg = f"{desc}: policy {policy.name} cannot be judged without the destination's country"
    else:
        msg = f"{desc}: policy {policy.name} cannot be judged ({_unknown_words(unknown)})"
    if policy.unknown == "allow":
        return verdict(Outcome.COMPLIANT, unknown, msg + "; unknown locations are allowed by this policy")
    if policy.unknown == "violation":
        return verdict(Outcome.VIOLATION, unknown, msg + "; unknown locations count as violations" + tail)
    return verdict(Outcome.INDETERMINATE, unknown, msg + tail)
