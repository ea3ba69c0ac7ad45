"""YAML loading for configuration and policies: YAML 1.2 booleans and line numbers for errors.

Why not plain `yaml.safe_load`: YAML 1.1 reads `NO` (Norway) as False and `on`/`off` as booleans,
which silently corrupts country lists. Only `true`/`false` are booleans here. `load_with_lines`
also returns a map from a data path (("allow", "jurisdictions", 2)) to its 1-based line, so
errors can say "file:line: allow.jurisdictions[2]: ...".
"""

from __future__ import annotations

import re

import yaml

from agent.errors import UserError


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _lines(node, path, out):
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _lines(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)


def load_with_lines(text: str, where: str) -> tuple[object, dict]:
    """Parse one YAML document; a syntax error is a UserError with file:line:column."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UserError(f"{where}{pos}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {e}") from None
    lines: dict = {}
    if node is not None:
        _lines(node, (), lines)
    return data, lines


def load(text: str, where: str):
    return load_with_lines(text, where)[0]


def dotted(path) -> str:
    """('allow', 'jurisdictions', 2) -> 'allow.jurisdictions[2]'."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def line_of(lines: dict, path) -> int | None:
    path = tuple(path)
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)
