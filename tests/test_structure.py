"""The house rules, checked on the source: no import circle, imports only point down, one input per
source package, small files, and every C accelerator loaded under the name its module imports.

The import graph is read with `ast` from every module under agent/, counting imports inside
functions too (a lazy import that closes a circle is still a circle: it only moves the failure to
run time). An import of a C extension (not a .py file) is left out: it imports nothing back.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"

# Bottom to top. A module belongs to the layer of its longest matching prefix; it may import its own
# layer and those below it, never one above.
LAYERS = [
    ("base", ["agent", "agent.errors", "agent.flow", "agent.fileio", "agent.yamlio", "agent.threadname",
              "agent.systemd_notify", "agent.output", "agent.accounting", "agent.reload_status", "agent.config",
              "agent.schemacheck"]),
    ("wire", ["agent.wire"]),
    ("names", ["agent.names"]),
    ("enrich", ["agent.enrich"]),
    ("policy", ["agent.policy"]),
    ("flowtable", ["agent.flowtable", "agent.connections"]),
    ("sources", ["agent.sources"]),
    ("judge", ["agent.judge"]),
    ("sinks", ["agent.sinks"]),
    ("live lane", ["agent.judge.fastlane"]),
    ("enforce", ["agent.enforce"]),
    ("commands", ["agent.commands"]),
    ("daemon", ["agent.daemon"]),
    ("cli", ["agent.cli", "agent.__main__"]),
]
# A source package may use another's public record only where the daemon needs one shape: the
# capture source emits conntrack's event record and reuses its rate limiter.
SOURCE_CROSSING = {("capture", "conntrack")}
MAX_LINES = 600


def modules(root: Path = AGENT) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (at any depth of the file)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:  # `from pkg import mod` names a module; `from mod import x` the module
                    deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    best, rank = -1, None
    for i, (_label, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} is in no layer of tests/test_structure.py: add it"
    return rank


def test_no_import_circle_in_agent():
    found = cycles(import_graph(modules()))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_circle(tmp_path):
    pkg = tmp_path / "agent"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from agent.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from agent.a import x\n")  # lazy, still a circle
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(modules(pkg))
    assert cycles(graph) == [["agent.a", "agent.sub.b"]]
    (pkg / "sub" / "b.py").write_text("import agent.c\n")
    assert cycles(import_graph(modules(pkg))) == [["agent.a", "agent.c", "agent.sub.b"]]


def test_imports_only_point_down():
    graph = import_graph(modules())
    up = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
          for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_a_source_package_holds_one_input_and_imports_no_other():
    graph = import_graph(modules())
    crossing = []
    for m, deps in graph.items():
        mine = re.match(r"agent\.sources\.(\w+)\.", m + ".")
        for d in deps:
            theirs = re.match(r"agent\.sources\.(\w+)\.", d + ".")
            if mine and theirs and mine[1] != theirs[1] and theirs[1] != "live" and \
                    (mine[1], theirs[1]) not in SOURCE_CROSSING:
                crossing.append(f"{m} imports {d}")
    assert not crossing, crossing
    loose = [p.name for p in (AGENT / "sources").iterdir()
             if p.is_file() and p.suffix == ".py" and p.name not in ("__init__.py", "live.py")]
    assert not loose, f"modules of agent/sources/ outside a source package: {loose}"


def test_every_file_is_small():
    big = [(str(p.relative_to(ROOT)), n) for p in sorted(AGENT.rglob("*")) if p.suffix in (".py", ".c", ".h")
           for n in [len(p.read_text().splitlines())] if n >= MAX_LINES]
    assert not big, f"files of {MAX_LINES} lines or more: {big}"


def _extensions():
    tree = ast.parse((ROOT / "setup.py").read_text())
    return [(c.args[0].value, c.args[1].elts[0].value) for c in ast.walk(tree)
            if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Extension"]


@pytest.mark.skipif(not os.environ.get("EGRESS_AGENT_REQUIRE_C"), reason="only where the build is required (.ci/run)")
@pytest.mark.parametrize("name,source", _extensions())
def test_each_accelerator_is_built_where_the_build_is_required(name, source):
    """The C tests skip where an accelerator is not built (setup.py builds them optionally); .ci/run
    installs gcc and sets EGRESS_AGENT_REQUIRE_C, so there a failed build fails here instead of
    silently turning those tests into skips."""
    assert list((ROOT / Path(source).parent).glob(name.rpartition(".")[2] + ".*.so")), f"{name} was not built"
    importlib.import_module(name)


@pytest.mark.parametrize("name,source", _extensions())
def test_each_accelerator_lives_beside_its_source_and_loads_when_built(name, source):
    """A C module moved without its import being updated would silently fall back to Python."""
    assert (ROOT / source).is_file()
    assert Path(source).parent == Path(*name.split(".")[:-1]), "the extension's module is not in its folder"
    built = list((ROOT / Path(source).parent).glob(name.rpartition(".")[2] + ".*.so"))
    if not built:
        pytest.skip(f"{name} is not built here")
    users = [m for m, p in modules().items() if name in p.read_text()]
    assert users, f"nothing imports {name}"
    ext = importlib.import_module(name)
    for m in users:
        mod = importlib.import_module(m)
        bound = [k for k, v in vars(mod).items() if v is ext or getattr(v, "__module__", None) == name]
        if not bound and m != "agent.sources.capfile.payload":  # payload imports it inside __init__
            pytest.fail(f"{m} names {name} but holds nothing of it: its import fell back to Python")


def test_every_package_is_installed():
    """pyproject.toml lists the packages a non-editable install (README command 1) ships: a package
    left out works in the editable checkout and is missing once installed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in AGENT.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
