"""The one YAML loader for configuration, policies, policy tests and jurisdiction data: bounded,
strict, and every error with file:line:column.

Why not plain `yaml.safe_load`:
- YAML 1.1 reads `NO` (Norway) as False and `on`/`off` as booleans, which silently corrupts
  country lists. Only `true`/`false` are booleans here.
- It trusts its input. A 1 KB alias bomb expands to billions of nodes in anything that walks the
  result (line maps, the JSON Schema validator); a recursive anchor or 1,000-deep nesting ends in
  RecursionError; a 5,000-digit integer in ValueError; `2099-02-30` in ValueError; a duplicate
  key silently replaces the first (a second `allow:` appended to a policy widens it unseen).
  Here each of these is a `UserError` naming the place, checked before anything walks the data.

Limits (documented in the README; `LIMITS` is the single source):
- file size `max_bytes` (default 4 MiB), read with `read_file` from regular files only, so a FIFO
  or a `/dev/zero` symlink named `*.yaml` cannot block or exhaust the loader;
- nesting depth `max_depth` (64);
- nodes after alias expansion `max_nodes` (200,000): what a reader of the data would walk;
- integer literals of at most `max_int_digits` (30) characters.

`load_with_lines` also returns a map from a data path (("allow", "jurisdictions", 2)) to its
1-based line, so errors can say "file:line: allow.jurisdictions[2]: ...".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from agent.errors import UserError
from agent.fileio import open_regular


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 << 20
    max_depth: int = 64
    max_nodes: int = 200_000
    max_int_digits: int = 30


LIMITS = Limits()


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, a depth bound while composing, strict ints and dates."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > LIMITS.max_depth:
                raise yaml.MarkedYAMLError(problem=f"nesting deeper than {LIMITS.max_depth} levels",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node):
        text = node.value.replace("_", "")
        if len(text.lstrip("+-")) > LIMITS.max_int_digits:
            raise ConstructorError(None, None, f"integer with more than {LIMITS.max_int_digits} digits",
                                   node.start_mark)
        return SafeConstructor.construct_yaml_int(self, node)

    def construct_yaml_timestamp(self, node):
        try:
            return SafeConstructor.construct_yaml_timestamp(self, node)
        except (ValueError, OverflowError) as e:
            raise ConstructorError(None, None, f"'{node.value}' is not a valid date or time ({e})",
                                   node.start_mark) from None


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _at(where: str, mark) -> str:
    return f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where


def _check_graph(root, where: str):
    """Expanded size, cycles and duplicate keys, visiting each distinct node once.

    An alias is the same node object as its anchor, so memoising sizes by id() costs O(distinct
    nodes) even for a bomb whose expansion is astronomically large.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        k = id(node)
        if k in sizes:
            return sizes[k]
        if k in active:
            raise UserError(f"{_at(where, node.start_mark)}: invalid YAML: an alias refers to the node that "
                            "contains it (recursive anchor)")
        active.add(k)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen and key.tag != "tag:yaml.org,2002:merge":
                        raise UserError(f"{_at(where, key.start_mark)}: invalid YAML: duplicate key "
                                        f"'{key.value}' (first at line {seen[key.value]})")
                    seen[key.value] = key.start_mark.line + 1
                total += size(key) + size(value)
                if total > LIMITS.max_nodes:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for value in node.value:
                total += size(value)
                if total > LIMITS.max_nodes:
                    break
        active.discard(k)
        if total > LIMITS.max_nodes:
            raise UserError(f"{_at(where, node.start_mark)}: invalid YAML: more than {LIMITS.max_nodes:,} nodes "
                            "once aliases are expanded (an alias bomb, or a file too large to be a policy)")
        sizes[k] = total
        return total

    size(root)


def _lines(node, path, out):
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _lines(v, path + (k.value if isinstance(k, yaml.ScalarNode) else "?",), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)


def load_with_lines(text: str, where: str) -> tuple[object, dict]:
    """Parse one YAML document within LIMITS; any problem is a UserError with file:line:column."""
    if len(text) > LIMITS.max_bytes:
        raise UserError(f"{where}: larger than {LIMITS.max_bytes >> 20} MiB; not loaded")
    node, data = _parse(_Loader, text, where)
    lines: dict = {}
    if node is not None:
        _lines(node, (), lines)
    return data, lines


def _parse(loader_class, text: str, where: str):
    """(root node, data) of one document (None, None when empty), problems as UserErrors."""
    try:
        loader = loader_class(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_graph(node, where)
            return node, loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        raise UserError(f"{_at(where, e.problem_mark)}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {e}") from None
    except RecursionError:  # belt and braces: the depth bound should stop this first
        raise UserError(f"{where}: invalid YAML: nested too deeply") from None


_CBase = getattr(yaml, "CSafeLoader", None)
if _CBase is not None:
    class _TrustedLoader(_CBase):
        """libyaml's parser with `_Loader`'s YAML 1.2 booleans and strict ints and dates."""

    _TrustedLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"):
        _TrustedLoader.add_constructor(_tag, _Loader.yaml_constructors[_tag])


def load_shipped(path) -> object:
    """A YAML file that ships inside the package (jurisdiction data), parsed by libyaml when it is
    there: ~10x faster than `load_file`, which `egress-agent lookup` would otherwise spend most of
    its time in. Same data (a test holds every shipped file equal under both), duplicate keys still
    refused; the depth and alias bounds are for files a user or an attacker wrote, which always go
    through `load_file`. Without libyaml this is `load_file`."""
    if _CBase is None:
        return load_file(path, "jurisdiction group")[0]
    where = str(path)
    return _parse(_TrustedLoader, decode(read_file(path, "jurisdiction group"), where), where)[1]


def load(text: str, where: str):
    return load_with_lines(text, where)[0]


def read_file(path, what: str = "file", max_bytes: int | None = None) -> bytes:
    """A regular file's bytes, at most `max_bytes` (LIMITS.max_bytes); UserError otherwise.

    Opened non-blocking and checked with fstat before reading, so a FIFO, a device or a directory
    named like a YAML file is refused at once instead of blocking or reading forever.
    """
    limit = LIMITS.max_bytes if max_bytes is None else max_bytes
    fd, st = open_regular(path, what)
    try:
        if st.st_size > limit:
            raise UserError(f"{path}: {what} is {st.st_size:,} bytes, more than the limit of {limit:,}")
        chunks, total = [], 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise UserError(f"{path}: {what} grew past the limit of {limit:,} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None
    finally:
        os.close(fd)


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte offset {e.start})") from None


def load_file(path, what: str = "file") -> tuple[object, dict, bytes]:
    """read_file + decode + load_with_lines: (data, line map, raw bytes)."""
    raw = read_file(path, what)
    data, lines = load_with_lines(decode(raw, str(path)), str(path))
    return data, lines, raw


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
