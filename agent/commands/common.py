"""Pieces every front door builds the same way: scoper, locator, jurisdictions, policies, pipeline."""

from __future__ import annotations

import gc
from contextlib import contextmanager

from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper
from agent.policy.jurisdictions import Jurisdictions


@contextmanager
def batch_run():
    """For a one-shot command that builds large acyclic structures (flow tables, report rows):

    - the cyclic collector is off: it would walk them again and again for nothing (~25% of an audit
      of 200,000 flows). Reference counting still frees everything; the collector is back on after.
    - glibc keeps up to 256 MiB of freed heap instead of handing it back at once (M_TOP_PAD): an
      audit frees and allocates hundreds of MiB in turn, and every page handed back and taken again
      is a page fault (190,000 of them, a fifth of an audit's time, on a 1M-packet capture; 70,000
      with the pad). The peak is unchanged. Process-wide and not undone: the command ends soon.
    """
    keep_freed_memory(256 << 20)
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def keep_freed_memory(pad: int) -> bool:
    """mallopt(M_TOP_PAD, pad) where the C library has it; False where it does not (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(-2, pad) == 1  # M_TOP_PAD


def build_locator(args, typed: bool = False) -> Locator:
    """`typed`: records read whole through geoip2's models (`lookup`); judged flows read raw."""
    scoper = Scoper(public_nets=getattr(args, "public_net", ()), local_nets=getattr(args, "local_net", ()))
    return Locator(getattr(args, "geoip_db", ()), scoper, typed=typed)


def build_pipeline(args):
    """The Pipeline of a front door's --policies, --recipients, GeoIP and scope flags."""
    from agent.judge.pipeline import Pipeline  # here: `lookup` and `jurisdictions` need no engine
    from agent.output import shipped_policies
    from agent.policy.load import load_policies

    jur = Jurisdictions.load()
    policies = load_policies(args.policies or shipped_policies(), jur)
    locator = build_locator(args)
    register, warnings = build_register(args, policies, jur)
    pipe = Pipeline(policies, jur, locator, locator.scoper, as_of=getattr(args, "as_of", None) or _today(),
                    register=register)
    pipe.register_warnings = warnings
    return pipe


def register_path(recipients: str | None):
    """The register to load: only the one named (--recipients). Never found implicitly: a register
    exempts flows, so which one is in force must be said."""
    return recipients or None


def build_register(args, policies, jur):
    """(Register or None, warnings) for a front door's --recipients/--policies."""
    from agent.policy.recipients import load_recipients

    path = register_path(getattr(args, "recipients", None))
    if path is None:
        return None, []
    return load_recipients(path, policies, jur, _today())


def _today():
    from datetime import UTC, datetime

    return datetime.now(UTC).date()


def as_of_date(text: str):
    """argparse type for --as-of: a calendar date (UTC day)."""
    import argparse
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date (YYYY-MM-DD)") from None


def write_report_html(path: str, title: str, report, inv):
    """The self-contained HTML report (`--html`) from an audit report and an inventory of the same flows."""
    from agent.sinks.html import MAX_ROWS, write_html

    # the page shows MAX_ROWS violations and charts their times: the rest are not made into dicts
    # (a million-flow report held 1.9 GB as dicts)
    full = report.to_json(placeholders=dict.fromkeys((*report.records, "flows"), []))
    write_html(path, title, {"by_country": full["destinations_by_country"], "inventory": inv.to_json(),
                             "violations": report.first_records("violation", MAX_ROWS),
                             "violations_total": report.record_count("violation"),
                             "violation_times": report.record_times("violation"), "inputs": full["inputs"],
                             "generated_at": full["generated_at"], "inbound_by_country": full["inbound_by_country"],
                             **{k: full[k] for k in ("totals", "verdicts", "policies", "geoip", "tool", "time_range",
                                                     "warnings")}})
