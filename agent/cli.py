"""Command line: audit | inventory | lookup | jurisdictions | policy check | policy test | policy schema | run.

Exit codes are the contract: 0 clean, 1 violations (audit) or failed policy tests, 2 usage or input
errors (a message naming file, line/offset and field; never a traceback), 70 an internal error (a
bug: a traceback and a line saying so, never 1, which a scheduler would read as "violations").
"""

from __future__ import annotations

import argparse
import os
import sys

from agent import __version__
from agent.errors import UserError

FORMATS = ("table", "json")
EXIT_INTERNAL = 70  # EX_SOFTWARE: a crash is neither "violations" (1) nor "bad input" (2)


def _add_geo(p):
    p.add_argument("--geoip-db", action="append", default=[], metavar="PATH",
                   help="MaxMind-format database (country/city, ASN, DB-IP, IPinfo); repeatable. "
                        "Default: embedded RIR registration data (iptocc)")
    p.add_argument("--local-net", action="append", default=[], metavar="CIDR",
                   help="treat this range as local (this side of the border); repeatable")
    p.add_argument("--public-net", action="append", default=[], metavar="CIDR",
                   help="treat this range as public although the IANA registry reserves it; repeatable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="egress-agent", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"egress-agent {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="dry run: judge captures and flow logs against the policies")
    a.add_argument("inputs", nargs="*", metavar="INPUT", help="pcap, pcapng or JSON-lines file, or a folder of them")
    a.add_argument("--policies", metavar="PATH", help="policy file or folder (default ./policies, else shipped)")
    a.add_argument("--recipients", metavar="PATH",
                   help="recipient register file or folder (e.g. recipients/, the example)")
    _add_geo(a)
    a.add_argument("--format", choices=FORMATS, default="table")
    a.add_argument("--output", metavar="FILE", help="write the report here instead of standard output")
    a.add_argument("--conntrack", action="store_true", help="audit one snapshot of the live conntrack table")
    a.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report (map, flows diagram, "
                   "violations over time, sortable tables; opens without network)")
    a.add_argument("--flows", action="store_true",
                   help="list every flow (addresses, counters, egress, country, host name and its source, "
                        "verdict per policy) under \"flows\" in the JSON report, and as a table")
    a.add_argument("--as-of", type=_as_of, metavar="DATE",
                   help="judge flows without a plausible time (none, before 1995, or more than a day after "
                        "DATE) as of DATE (default: today, UTC); the report lists them")
    a.add_argument("--netns", metavar="NAME", help="with --conntrack: the named network namespace")
    a.add_argument("--export-ports", type=_ports, metavar="PORTS",
                   help="read captures as NetFlow v5/v9 and IPFIX exports to these UDP ports (comma-separated, "
                        "e.g. 2055,4739): the flows routers exported, judged as a collector would")
    a.add_argument("--textfile", metavar="FILE",
                   help="also write the run's result for node_exporter's textfile collector (violations per "
                        "policy, success, last run, inputs read); a failed run writes success 0")
    a.add_argument("--strict", action="store_true",
                   help="exit 2 when connections were read but none was judged (no local host recognised: "
                        "pass --local-net), instead of a silent pass")

    inv = sub.add_parser("inventory", help="observed transfers (exporter -> recipient -> countries) against the "
                                           "recipient register: undeclared, unseen, outside declared locations")
    inv.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="pcap, pcapng, JSON-lines flow log or evidence log, or a folder of them")
    inv.add_argument("--policies", metavar="PATH", help="policy file or folder (default ./policies, else shipped)")
    inv.add_argument("--recipients", metavar="PATH",
                     help="recipient register file or folder (e.g. recipients/, the example)")
    _add_geo(inv)
    inv.add_argument("--format", choices=(*FORMATS, "csv"), default="table")
    inv.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    inv.add_argument("--as-of", type=_as_of, metavar="DATE", help="as for audit")
    inv.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")

    lk = sub.add_parser("lookup", help="where addresses are, and how we know")
    lk.add_argument("addresses", nargs="+", metavar="ADDRESS")
    _add_geo(lk)
    lk.add_argument("--format", choices=FORMATS, default="table")

    ju = sub.add_parser("jurisdictions", help="the jurisdiction groups: members, dates, conditions, sources")
    ju.add_argument("group", nargs="?", metavar="GROUP")
    ju.add_argument("--at", type=_as_of, metavar="DATE", help="only the entries in force on this UTC day")
    ju.add_argument("--format", choices=FORMATS, default="table")

    pol = sub.add_parser("policy", help="check, test or describe policies")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate policies; report every problem (exit 2 on any)")
    pc.add_argument("path", nargs="?")
    pc.add_argument("--recipients", metavar="PATH", help="check this recipient register against the policies too")
    pc.add_argument("--config", metavar="FILE",
                    help="also compile what policies with `enforce: refuse` would refuse on this host (its "
                         "local_nets, databases, enforcement settings) and refuse any that would catch a "
                         "never-refuse address (resolvers, NTP, management, scrapers)")
    pt = psub.add_parser("test", help="run the *.test.yaml files beside the policies (exit 1 on failures)")
    pt.add_argument("path", nargs="?")
    ps = psub.add_parser("schema", help="print the policy JSON Schema")
    ps.add_argument("--recipients", dest="recipients_schema", action="store_true",
                    help="print the recipient register's JSON Schema instead")

    en = sub.add_parser("enforce", help="enforcement: what the kernel refuses now")
    esub = en.add_subparsers(dest="enforce_command", required=True)
    es = esub.add_parser("status", help="the agent's nftables table: sets, refused connections, last build "
                                        "(exit 1 when none is loaded)")
    es.add_argument("--netns", metavar="NAME", help="the named network namespace the agent enforces in")
    es.add_argument("--format", choices=FORMATS, default="table")

    r = sub.add_parser("run", help="the daemon: watch live flows, export metrics and evidence")
    r.add_argument("--config", metavar="FILE", help="YAML config (flags override it)")
    r.add_argument("--policies", metavar="PATH")
    r.add_argument("--recipients", metavar="PATH", help="recipient register file or folder")
    _add_geo(r)
    r.add_argument("--listen", metavar="ADDR:PORT", help="metrics endpoint (default 127.0.0.1:9807)")
    r.add_argument("--web-config", metavar="FILE",
                   help="TLS and basic auth for the metrics endpoint (Prometheus exporter-toolkit web-config.yml)")
    r.add_argument("--evidence", metavar="FILE", help="evidence log path (JSON lines)")
    r.add_argument("--netns", metavar="NAME", help="watch this named network namespace")
    r.add_argument("--sample", type=int, metavar="N", help="keep 1 in N new flows (default 1: all)")
    r.add_argument("--enable-conntrack", action="store_true", default=None,
                   help="let the agent turn on connection tracking and accounting if they are off")
    r.add_argument("--rate-limit", type=float, metavar="PER_SECOND",
                   help="judge at most this many new flows per second per destination (0: no limit)")
    r.add_argument("--queue-size", type=int, metavar="N", help="bounded event queue (default 65536)")
    r.add_argument("--rcvbuf", type=int, metavar="BYTES", help="netlink event socket buffer")
    r.add_argument("--no-attribution", action="store_true", default=None, help="do not look up processes")
    r.add_argument("--source", action="append", choices=("conntrack", "capture", "netflow", "sflow"),
                   help="flow sources (repeatable; default conntrack). capture with conntrack: names on "
                        "conntrack's flows from DNS answers and TLS/QUIC hellos (needs CAP_NET_RAW); "
                        "netflow, sflow: collect what routers export (NetFlow v5/v9, IPFIX; sFlow v5)")
    r.add_argument("--netflow-listen", action="append", metavar="HOST:PORT",
                   help="netflow source: UDP address for NetFlow v5/v9 and IPFIX (repeatable; e.g. 0.0.0.0:2055)")
    r.add_argument("--sflow-listen", action="append", metavar="HOST:PORT",
                   help="sflow source: UDP address for sFlow v5 (repeatable; e.g. 0.0.0.0:6343)")
    r.add_argument("--enforce", choices=("observe", "dry-run", "refuse"),
                   help="the host's enforcement switch (default observe): dry-run counts what policies with "
                        "`enforce: dry-run` would refuse, touching no traffic; refuse also refuses, in the kernel, "
                        "new connections that policies with `enforce: refuse` forbid (README: Enforcement)")
    r.add_argument("--management-net", action="append", metavar="CIDR",
                   help="never refused by enforcement (enforcement.management_nets): where the host is managed "
                        "from; repeatable")
    r.add_argument("--unknown-exporters", choices=("judge", "refuse"),
                   help="flows from exporters not listed under `exporters:` (default judge; counted either way)")
    r.add_argument("--interface", action="append", metavar="IFACE",
                   help="capture source: listen here (repeatable; default every interface but loopback)")
    r.add_argument("--no-host-addresses", action="store_true", default=None,
                   help="do not treat the host's own (public) addresses as local")
    r.add_argument("--geoip-check-interval", type=float, metavar="SECONDS",
                   help="how often to look for a new GeoIP database file (default 60)")
    r.add_argument("--reload-check-interval", type=float, metavar="SECONDS",
                   help="reload when policy or config files change (0: only on SIGHUP)")
    r.add_argument("--evidence-max-bytes", type=int, metavar="BYTES", help="rotate the evidence log past this size")
    r.add_argument("--evidence-backups", type=int, metavar="N", help="rotated evidence files to keep")
    r.add_argument("--evidence-fsync", action="store_true", default=None, help="fsync after every evidence line")

    rl = sub.add_parser("reload", help="ask the running daemon to reload, wait, and report whether it worked")
    rl.add_argument("--pid", type=int, help="the daemon's pid (default: the one in the status file)")
    rl.add_argument("--status", metavar="FILE",
                    help="the daemon's reload status file (default $RUNTIME_DIRECTORY/reload-status.json)")
    rl.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS")
    return ap


def _error(text: str):
    """One error line; under journald at priority err (3), so `journalctl -p err` shows it."""
    prefix = "<3>" if os.environ.get("JOURNAL_STREAM") else ""
    print("\n".join(f"{prefix}{line}" for line in f"egress-agent: error: {text}".splitlines()), file=sys.stderr)


def _ports(text: str) -> tuple[int, ...]:
    """`--export-ports 2055,4739`: UDP ports 1-65535."""
    try:
        ports = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of ports") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"'{text}': ports are 1 to 65535")
    return ports


def _as_of(text):
    from agent.commands.common import as_of_date

    return as_of_date(text)


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parse_args`, but an unknown flag after a subcommand is reported with that subcommand's
    usage (`egress-agent audit: error: ...`), not the top-level one, which lists no flags at all."""
    args, extra = ap.parse_known_args(argv)
    if extra:
        p = ap
        for dest in ("command", "policy_command", "enforce_command"):
            subs = next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(args, dest, None)
            if subs and name in subs:
                p = subs[name]
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    args = parse(build_parser(), argv)
    try:
        if args.command == "audit":
            from agent.commands.audit import run_audit
            return run_audit(args)
        if args.command == "inventory":
            from agent.commands.inventory import run_inventory
            return run_inventory(args)
        if args.command == "lookup":
            from agent.commands.lookup import run_lookup
            return run_lookup(args)
        if args.command == "jurisdictions":
            from agent.commands.jurisdictions import run_jurisdictions
            return run_jurisdictions(args)
        if args.command == "policy":
            from agent.commands.policy import run_policy
            return run_policy(args)
        if args.command == "run":
            from agent.daemon import run_daemon
            return run_daemon(args)
        if args.command == "enforce":
            from agent.commands.enforce import run_enforce
            return run_enforce(args)
        if args.command == "reload":
            from agent.reload_status import run_reload
            return run_reload(args)
    except UserError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except MemoryError:
        _error("out of memory; the input is larger than this machine can audit at once")
        return EXIT_INTERNAL
    except Exception:  # a bug, not bad input: never exit 1, which means "violations found"
        import traceback

        traceback.print_exc()
        _error(f"internal error (a bug; please report it with the lines above); exit {EXIT_INTERNAL}")
        return EXIT_INTERNAL
    return 2
