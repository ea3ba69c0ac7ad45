"""Refuse sets: for each policy in `refuse` mode, the destination intervals it forbids today.

Contract: `compile_plan(pipeline, refusing, keep, cuts, at) -> Plan`, pure apart from the clock it
is given. The verdicts are the engine's own (`Pipeline.judge`), never re-derived: the address space
is cut wherever anything the engine reads can change (every database network or registration run,
every network a policy, exception or recipient names, every scope range, every never-refuse
network), one address of each public piece is judged as a new TCP connection the policy selects,
and a piece is refused when that verdict is a violation. So exceptions in force, recipients'
declared networks, `unknown:` settings and jurisdiction dates count exactly as they do in the
monitor. What a flow's address cannot show (host names, processes) cannot be decided in the kernel:
a policy selecting by process, unit or container is refused at load in refuse mode, and names are
the allow sets the enforcer fills from DNS answers.

A piece a policy would refuse that is in a never-refuse network is left out and named in
`PolicySets.caught`, which `policy check` and the daemon's start-up report as a problem.
"""

from __future__ import annotations

import ipaddress
import pwd
import time
from bisect import bisect_right
from dataclasses import dataclass, field

from agent.enforce.cuts import Cuts
from agent.enrich.scope import merge_intervals
from agent.flow import Flow, Outcome, Who
from agent.policy.compiled import NetMask

_TOP = {4: 1 << 32, 6: 1 << 128}
# IPv6 forms of IPv4 addresses (mapped, Teredo, 6to4, NAT64): the engine locates the embedded IPv4
# address per address, so a piece of them is not uniform; they are never refused (said in the README;
# a mapped address never is a destination on the wire)
_EMBEDDED6 = tuple(ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "2001::/32", "2002::/16", "64:ff9b::/96",
                                                     "64:ff9b:1::/48"))


@dataclass
class PolicySets:
    name: str
    sources: dict[int, list[tuple[int, int]]]  # empty lists for a family: no source selector there
    any_source: bool
    protocols: tuple[int, ...]
    ports: tuple[tuple[int, int], ...]
    uids: tuple[int, ...]
    dst: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: {4: [], 6: []})
    caught: list[str] = field(default_factory=list)

    def elements(self) -> dict[int, int]:
        return {v: len(r) for v, r in self.dst.items()}


@dataclass
class Plan:
    policies: list[PolicySets]
    keep: dict[int, list[tuple[int, int]]]
    pieces: int = 0  # pieces of address space judged
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    built_at: float = 0.0

    def problems(self) -> list[str]:
        return [f"policy {p.name}: refuse would catch {why}" for p in self.policies for why in p.caught]


def _span(net) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"user '{user}' does not exist on this host") from None


def probe_flow(p, v: int) -> Flow | None:
    """A new outbound TCP (or the policy's protocol) connection the policy selects, to be given its
    destination; None when the policy selects nothing of family v."""
    sel = p.applies_to
    src = next((n for n in sel.sources if n.version == v), None)
    if sel.sources and src is None:
        return None
    src_text = str(src.network_address) if src is not None else ("192.0.2.1" if v == 4 else "2001:db8::1")
    proto = min(sel.protocols) if sel.protocols else 6
    dport = sel.ports[0][0] if sel.ports else 443
    who = None
    if sel.users:
        u = sorted(sel.users)[0]
        who = Who(uid=_uid(u), user=None if u.isdigit() else u)
    return Flow(proto=proto, src=src_text, sport=40000, dst="", dport=dport, who=who)


def policy_sets(p) -> PolicySets:
    sel = p.applies_to
    sources = {v: merge_intervals(_span(n) for n in sel.sources if n.version == v) for v in (4, 6)}
    return PolicySets(p.name, sources, not sel.sources, tuple(sorted(sel.protocols)), sel.ports,
                      tuple(sorted({_uid(u) for u in sel.users})))


def compile_plan(pipeline, refusing: list, keep: list, cuts: Cuts, now: float | None = None) -> Plan:
    """`refusing`: the policies to compile (already in effective refuse mode); `keep`: never.Keep
    entries; `cuts`: cuts.location_cuts of the pipeline's locator."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    out = Plan([policy_sets(p) for p in refusing],
               {v: merge_intervals(_span(k.network) for k in keep if k.network.version == v) for v in (4, 6)})
    if 6 not in cuts.listable:
        out.warnings.append("the embedded registration data cannot list IPv6 networks: IPv6 destinations are "
                            "refused only where a policy denies their network by name (use a GeoIP database)")
    index = {p.name: i for i, p in enumerate(pipeline.policies)}
    sets = {p.name: ps for p, ps in zip(refusing, out.policies, strict=True)}
    deny = {p.name: [n for n in (p.deny.networks if p.deny else ())] for p in refusing}
    # what else a verdict reads from the address: the policies' networks (the pipeline's own mask)
    # and the recipients' networks
    dst_nets = pipeline._dst_nets
    rec_nets = NetMask(_rec_list(pipeline))
    nets = [*dst_nets.networks, *rec_nets.networks]
    for v in (4, 6):
        cut = set(cuts.cuts[v]) | {0}
        cut |= {s for s, _, _ in pipeline.scoper.ranges(v)}
        for n in nets + [k.network for k in keep] + (list(_EMBEDDED6) if v == 6 else []):
            if n.version == v:
                lo, hi = _span(n)
                cut |= {lo, hi + 1}
        starts = sorted(c for c in cut if c < _TOP[v])
        embedded = [_span(n) for n in _EMBEDDED6] if v == 6 else []
        keep_v = out.keep[v]
        probes = {p.name: probe_flow(p, v) for p in refusing}
        refused: dict[str, list[tuple[int, int]]] = {p.name: [] for p in refusing}
        listed = v in cuts.listable
        known: dict[tuple, bool] = {}  # (policy, location key, network masks) -> violation
        for i, lo in enumerate(starts):
            hi = (starts[i + 1] if i + 1 < len(starts) else _TOP[v]) - 1
            if pipeline.scoper.scope_int(v, lo) != "public" or any(a <= lo <= b for a, b in embedded):
                continue
            out.pieces += 1
            loc = cuts.location_key(v, lo)
            masks = (dst_nets.mask_int(v, lo) if dst_nets else 0, rec_nets.mask_int(v, lo) if rec_nets else 0)
            dst = None
            for p in refusing:
                probe = probes[p.name]
                if probe is None:
                    continue
                if not listed and not any(n.version == v and lo in _int_net(n) for n in deny[p.name]):
                    continue
                key = (p.name, loc, masks) if loc is not None else None
                bad = known.get(key) if key is not None else None
                if bad is None:
                    dst = dst or str(ipaddress.ip_address(lo) if v == 6 else ipaddress.IPv4Address(lo))
                    flow = Flow(proto=probe.proto, src=probe.src, sport=40000, dst=dst, dport=probe.dport,
                                first_seen=now, last_seen=now, who=probe.who)
                    # the outcome only (no message rewrite); the engine's verdict for this piece
                    bad = pipeline.judge(flow).outcomes[index[p.name]].outcome == Outcome.VIOLATION
                    if key is not None:
                        known[key] = bad
                if not bad:
                    continue
                j = bisect_right(keep_v, (lo, _TOP[v])) - 1
                if j >= 0 and keep_v[j][1] >= lo:
                    sets[p.name].caught.append(_caught(keep, v, lo, hi))
                    continue
                refused[p.name].append((lo, hi))
        for ps in out.policies:
            ps.dst[v] = merge_intervals(refused[ps.name])
            ps.caught = list(dict.fromkeys(ps.caught))
    out.seconds = time.perf_counter() - t0
    out.built_at = now
    return out


def _int_net(n) -> range:
    lo, hi = _span(n)
    return range(lo, hi + 1)


def _rec_list(pipeline) -> list:
    if pipeline.register is None:
        return []
    return [n for r in pipeline.register.recipients for n in r.match.networks]


def _caught(keep, v: int, lo: int, hi: int) -> str:
    for k in keep:
        a, b = _span(k.network)
        if k.network.version == v and a <= lo and hi <= b:
            return k.why
    return f"never-refuse address {ipaddress.ip_address(lo)}"
