"""What the kernel saw: the agent's nftables counter of new egress connections.

    table inet egress_agent
      set nonpublic4 / nonpublic6   every address the agent does not call public (from its scope table)
      set embedded6                   Teredo and local-use NAT64 space (scope per embedded IPv4: not countable)
      chain egress_output           hook output,  priority 300: ct state new, first packet, local -> public
      chain egress_forward          hook forward, priority 300: the same for forwarded (container) traffic
      chain egress_input            hook input,   priority 300: public -> local (only with `inbound`)

With `inbound` (some policy judges connections public peers open to local hosts) the input and
forward chains also count those, under the comment `egress-agent:kernel-flows-inbound`; the
daemon adds them to its books only while it judges inbound connections.

Each counting rule carries the comment `egress-agent:kernel-flows` and matches the *original*
tuple (`ct original ip saddr/daddr`), exactly what conntrack events report, and only the first
packet of a connection (`ct status` not yet `confirmed`), so its packet counter is the number of
new egress connections the kernel created. The sets are generated from `Scoper.ranges`, so the
kernel's notion of "egress" and `Scoper.is_egress` are the same table. Priority 300 counts after
the usual filter chains (priority 0), so a connection a firewall drops is not counted.

`KernelCounter(netns).read()` sums those counters (None when the table or rules are missing: then
loss accounting is unavailable and the daemon says so). Reading shells out to `nft -j` (~5 ms),
which the daemon does once per accounting interval, not per flow.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from agent.enrich.scope import EMBEDDED_MARKERS, Scoper, merge_intervals

COMMENT = "egress-agent:kernel-flows"
COMMENT_IN = "egress-agent:kernel-flows-inbound"
TABLE = "egress_agent"


def _elements(intervals, version: int) -> str:
    addr = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    out = []
    for lo, hi in intervals:
        net = _as_prefix(lo, hi, version)
        out.append(str(net) if net else f"{addr(lo)}-{addr(hi)}")
    return ", ".join(out)


def _as_prefix(lo: int, hi: int, version: int):
    bits = 32 if version == 4 else 128
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        plen = bits - size.bit_length() + 1
        return ipaddress.ip_network((lo, plen)) if version == 4 else ipaddress.IPv6Network((lo, plen))
    return None


def nonpublic(scoper: Scoper, version: int):
    """Merged (lo, hi) intervals of every address whose scope is not public (the embedded-IPv4
    regions excluded: their scope is per address, see EMBEDDED_MARKERS)."""
    rows = scoper.ranges(version)
    return merge_intervals([(lo, hi) for lo, hi, s in rows if s != "public" and s not in EMBEDDED_MARKERS])


def embedded(scoper: Scoper):
    return merge_intervals([(lo, hi) for lo, hi, s in scoper.ranges(6) if s in EMBEDDED_MARKERS])


def nft_table(scoper: Scoper, inbound: bool = False) -> str:
    """The nftables table (text for `nft -f`): tracking on, and the kernel's count of egress flows
    (and, with `inbound`, of inbound ones).

    It is idempotent: it deletes and recreates the table, so a reload with other public/local
    networks replaces the sets (and resets the counters; the daemon notices and rebases).
    """
    t6 = embedded(scoper)
    new = "ct state new ct status & confirmed == 0"
    no_t6 = "ct original ip6 saddr != @embedded6 ct original ip6 daddr != @embedded6 " if t6 else ""

    def rules(local: str, comment: str) -> tuple[str, str]:
        """(IPv4, IPv6) rules counting new connections opened from the `local` side ("saddr": egress)."""
        peer = "daddr" if local == "saddr" else "saddr"
        return (f"{new} ct original ip {local} @nonpublic4 ct original ip {peer} != @nonpublic4 counter "
                f"comment \"{comment}\"",
                f"{new} ct original ip6 {local} @nonpublic6 ct original ip6 {peer} != @nonpublic6 {no_t6}counter "
                f"comment \"{comment}\"")

    egress, inward = rules("saddr", COMMENT), rules("daddr", COMMENT_IN)
    hooks = [("egress_output", "output", egress), ("egress_forward", "forward", egress + (inward if inbound else ()))]
    if inbound:
        hooks.append(("egress_input", "input", inward))
    chains = []
    for chain, hook, body in hooks:
        lines = "".join(f"    {r}\n" for r in body)
        chains.append(f"  chain {chain} {{\n    type filter hook {hook} priority 300; policy accept;\n{lines}  }}\n")

    def one(name: str, kind: str, elements: str) -> str:
        return f"  set {name} {{ type {kind}; flags interval; elements = {{ {elements} }} }}\n"

    sets = (one("nonpublic4", "ipv4_addr", _elements(nonpublic(scoper, 4), 4))
            + one("nonpublic6", "ipv6_addr", _elements(nonpublic(scoper, 6), 6)))
    if t6:
        sets += one("embedded6", "ipv6_addr", _elements(t6, 6))
    return (f"# Added by egress-agent. The rules accept and drop nothing: they make the kernel track\n"
            f"# connections here and count new local -> public connections (see agent/sources/kernel_count.py).\n"
            f"table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{sets}{''.join(chains)}}}\n")


def _nft(netns: str | None, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    pre = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(pre + ["nft", *args], input=stdin, capture_output=True, text=True, timeout=10)


def install(scoper: Scoper, netns: str | None = None, inbound: bool = False) -> str | None:
    """Load `nft_table`; the error text when nft failed, else None."""
    try:
        r = _nft(netns, "-f", "-", stdin=nft_table(scoper, inbound))
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return r.stderr.strip() or f"nft exited {r.returncode}" if r.returncode else None


def counted(ruleset: dict, comments: tuple[str, ...] = (COMMENT,)) -> int | None:
    """Sum of the packet counters of the agent's counting rules (those with one of `comments`) in
    `nft -j` output; None if there is none."""
    return _sums(ruleset, comments)[0]


def _sums(ruleset: dict, comments: tuple[str, ...]) -> tuple[int | None, set[str]]:
    """(the sum as `counted` gives it, the comments of the counting rules found)."""
    total, found = 0, set()
    for item in ruleset.get("nftables", ()):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule or rule.get("comment") not in comments:
            continue
        for expr in rule.get("expr", ()):
            if isinstance(expr, dict) and "counter" in expr:
                total += int(expr["counter"].get("packets", 0))
                found.add(rule["comment"])
    return (total if found else None), found


class KernelCounter:
    """Reads the kernel's count of new egress connections in one network namespace; with `inbound`,
    of inbound ones too when the table counts them (`inbound_counted` says whether it does)."""

    def __init__(self, netns: str | None = None, inbound: bool = False):
        self.netns = netns
        self.inbound = inbound
        self.inbound_counted = False
        self.error: str | None = None

    def read(self) -> int | None:
        try:
            r = _nft(self.netns, "-j", "list", "table", "inet", TABLE)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = f"nft: {e}"
            return None
        if r.returncode != 0:
            self.error = (r.stderr.strip().splitlines() or [f"nft exited {r.returncode}"])[-1]
            return None
        try:
            n, found = _sums(json.loads(r.stdout), (COMMENT, COMMENT_IN) if self.inbound else (COMMENT,))
        except (ValueError, TypeError, AttributeError) as e:
            self.error = f"nft -j output not understood: {e}"
            return None
        if COMMENT not in found:  # inbound rules alone do not make egress accountable
            n = None
        self.inbound_counted = COMMENT_IN in found
        self.error = None if n is not None else f"table inet {TABLE} has no rule commented {COMMENT}"
        return n
