"""`egress-agent policy check|test|schema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.commands.policy_tests import run_test_file, test_files
from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies, schema


def lookalike_warnings(policies) -> list[str]:
    """Host names in policies that may be look-alikes of the names meant (mixed scripts): such a
    name never matches the real one, and nothing else would say so."""
    from agent.names.hostnames import script_warnings

    out = []
    for p in policies:
        places = [("allow", p.allow), ("deny", p.deny)] + [(f"exceptions[{e.id}]", e.destinations)
                                                           for e in p.exceptions]
        for where, dest in places:
            for pat in (dest.hostnames if dest is not None else ()):
                for why in script_warnings(pat.text):
                    out.append(f"{p.file}: {where}.hostnames: '{pat.text}': {why}; a look-alike of another name? "
                               "(UTS #39) It matches only itself")
    return out


def _check_refuse(args, path):
    """What the refuse policies would refuse here; exit 2 when one would catch a never-refuse address."""
    from dataclasses import replace

    from agent.commands.enforce import refuse_plan
    from agent.config import load_config

    plan = refuse_plan(replace(load_config(getattr(args, "config", None)), policies=str(path)))
    if plan is None:
        return
    if plan.problems():
        raise UserError("refuse would catch addresses that are never refused", plan.problems())
    for w in plan.warnings:
        print(f"egress-agent: warning: {w}", file=sys.stderr)
    for p in plan.policies:
        e = p.elements()
        print(f"ok  refuse {p.name}: {e[4]} IPv4 and {e[6]} IPv6 destination intervals "
              f"({plan.pieces} pieces of address space judged in {plan.seconds:.2f} s)")


def run_policy(args) -> int:
    from agent.output import shipped_policies

    if args.policy_command == "schema":
        if getattr(args, "recipients_schema", False):
            from agent.policy.recipients import schema as recipients_schema

            print(json.dumps(recipients_schema(), indent=2))
        else:
            print(json.dumps(schema(), indent=2))
        return 0
    path = Path(args.path) if args.path else shipped_policies()
    jur = Jurisdictions.load()
    if args.policy_command == "check":
        policies = load_policies(path, jur)
        for p in policies:
            print(f"ok  {p.name}  ({p.file}, {len(p.exceptions)} exception(s))")
        for w in lookalike_warnings(policies):
            print(f"egress-agent: warning: {w}", file=sys.stderr)
        if getattr(args, "config", None) or any(p.enforce == "refuse" for p in policies):
            _check_refuse(args, path)
        from agent.commands.common import _today, register_path
        from agent.policy.recipients import load_recipients

        reg_path = register_path(getattr(args, "recipients", None))
        if reg_path is not None:
            register, warnings = load_recipients(reg_path, policies, jur, _today())
            for r in register.recipients:
                print(f"ok  recipient {r.id}  ({r.file}, {len(r.transfers)} transfer(s))")
            for w in warnings:
                print(f"egress-agent: warning: {w}", file=sys.stderr)
        return 0
    files = test_files(path)
    if not files:
        raise UserError(f"{path}: no *.test.yaml files found")
    passed = failed = 0
    for f in files:
        for r in run_test_file(f, jur):
            if r.passed:
                passed += 1
                print(f"PASS {r.file}:{r.line}: {r.name}")
            else:
                failed += 1
                print(f"FAIL {r.file}:{r.line}: {r.name}: {r.detail}")
    print(f"{passed} passed, {failed} failed")
    sys.stdout.flush()
    return 1 if failed else 0
