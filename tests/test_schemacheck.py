"""The hand schema check (agent.schemacheck) against jsonschema, the reference it stands in for.

Real documents (the shipped policies, config and recipient register, and the config's defaults)
are damaged at random (values replaced by near-valid and wrong ones, keys dropped and added, list
items repeated) and judged both ways: where the hand check decides, it decides as jsonschema
does, and `schema_errors` gives jsonschema's errors. The shipped documents pass without jsonschema
ever being imported: that is the point of the hand check.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import yamlio
from agent.config import SCHEMA, Config, _as_dict
from agent.policy.load import _plain
from agent.policy.load import schema as policy_schema
from agent.policy.recipients import schema as register_schema
from agent.schemacheck import Unsure, schema_errors, valid

ROOT = Path(__file__).resolve().parent.parent


def _docs() -> list[tuple[str, dict, dict]]:
    out = [("config defaults", SCHEMA, _as_dict(Config()))]
    out.append(("deploy/agent.yaml", SCHEMA, yamlio.load_file(ROOT / "deploy" / "agent.yaml", "config")[0] or {}))
    for p in sorted((ROOT / "policies").glob("*.yaml")):
        if not p.name.endswith(".test.yaml"):
            out.append((p.name, policy_schema(), _plain(yamlio.load_file(p, "policy")[0])))
    out.append(("register", register_schema(),
                _plain(yamlio.load_file(ROOT / "recipients" / "example-register.yaml", "register")[0])))
    return out


DOCS = _docs()

# values near what the schemas take and far from it
_TEXT = st.sampled_from(["", "EU", "eu", "CN-MAINLAND", "AS64500", "AS", "2025-01-01", "2025-1-1", "10.0.0.0/8",
                         "203.0.113.0/24", "127.0.0.1:9807", "[::1]:9807", "443", "1-1024", "x" * 70, "scc",
                         "violation", "outbound", "dry-run", "judge", "a b", "Ünïcode", "1.5"])
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 70_000), st.sampled_from([0.0, 1.0, 2.5, -1.0]),
                    st.floats(allow_nan=True, allow_infinity=True), _TEXT)
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=6)


def _paths(node, here=()):
    yield here
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*here, i))


def _mutate(doc, draw_path: int, action: int, value, key: str):
    paths = list(_paths(doc))
    path = paths[draw_path % len(paths)]
    if not path:
        return value if action == 0 else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if action == 0:
        parent[last] = value
    elif action == 1 and isinstance(parent, dict):
        del parent[last]
    elif action == 2 and isinstance(parent, dict):
        parent[key] = value
    elif action == 3 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))  # a repeated item (uniqueItems)
    elif action == 4 and isinstance(parent[last], str):
        parent[last] = parent[last] + " " if len(parent[last]) % 2 else parent[last][:-1]
    return doc


@settings(max_examples=600, deadline=None)
@given(st.integers(0, len(DOCS) - 1),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 4), _VALUE,
                          st.sampled_from(["name", "version", "extra", "home", "severity", "listen", "id"])),
                max_size=3))
def test_the_hand_check_decides_as_jsonschema_does(which, mutations):
    _name, schema, doc = DOCS[which]
    doc = copy.deepcopy(doc)
    for path, action, value, key in mutations:
        doc = _mutate(doc, path, action, copy.deepcopy(value), key)
    reference = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    try:
        decided = valid(schema, doc)
    except Unsure:
        decided = None
    if decided is not None:
        assert decided == (not reference), (doc, [e.message for e in reference])
    got = list(schema_errors(schema, doc))
    assert [(list(e.absolute_path), e.message) for e in got] == [(list(e.absolute_path), e.message) for e in reference]


def test_the_shipped_documents_pass_the_hand_check():
    for name, schema, doc in DOCS:
        assert valid(schema, doc) is True, name


def test_loading_the_shipped_documents_never_imports_jsonschema():
    code = ("import sys\n"
            "from agent.config import load_config, with_flags\n"
            "from agent.policy.jurisdictions import Jurisdictions\n"
            "from agent.policy.load import load_policies\n"
            "from agent.policy.recipients import load_recipients\n"
            "from datetime import date\n"
            "import argparse\n"
            "j = Jurisdictions.load()\n"
            "with_flags(load_config('deploy/agent.yaml'), argparse.Namespace())\n"
            "ps = load_policies('policies', j)\n"
            "load_recipients('recipients/example-register.yaml', ps, j, date(2026, 1, 1))\n"
            "assert 'jsonschema' not in sys.modules, 'jsonschema was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_bad_document_still_gets_jsonschemas_own_messages():
    schema = policy_schema()
    doc = copy.deepcopy(next(d for n, _s, d in DOCS if n == "gdpr-personal-data.yaml"))
    doc["severity"] = "apocalyptic"
    doc["surprise"] = 1
    got = [e.message for e in schema_errors(schema, doc)]
    assert got == [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)] and len(got) == 2
