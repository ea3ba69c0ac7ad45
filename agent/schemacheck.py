"""Schema checks of config, policy and register files without importing jsonschema when they pass.

Contract: `schema_errors(schema, data)` yields what `jsonschema.Draft202012Validator(schema)
.iter_errors(data)` yields, in the same order, message for message: when a document passes a
hand check it yields nothing (and jsonschema is never imported); otherwise jsonschema itself makes
the errors, so every message a user reads is still jsonschema's.

Why: importing jsonschema (attrs, referencing, its format checkers) costs 60-100 ms, more than
everything else a small audit or `policy test` does after start-up, and almost every file a
command reads is valid. The hand check (`valid`) knows the keywords our three schemas use (type,
properties, additionalProperties, required, minProperties, items, minItems, uniqueItems, enum,
const, pattern, minLength, maxLength, minimum, maximum, oneOf, local $ref; format and the
annotations assert nothing, as for a validator without a format checker) over the values YAML and
JSON give (dict with str keys, list, str, int, float, bool, None). Where it meets anything else (a
keyword, a value type or an equality it does not decide exactly) it stops unsure and jsonschema
decides: `valid` never says True where jsonschema finds an error, nor False where it finds none
(tests/test_schemacheck.py compares the two on mutated real documents).
"""

from __future__ import annotations

import re
from functools import lru_cache

_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples", "format",
                          "$defs", "deprecated", "readOnly", "writeOnly"})


class Unsure(Exception):
    """The hand check cannot decide this document exactly: jsonschema will."""


def schema_errors(schema: dict, data):
    """jsonschema's errors of `data` under a 2020-12 `schema` (none when the hand check passes it)."""
    try:
        if valid(schema, data):
            return iter(())
    except Unsure:
        pass
    import jsonschema  # only for a document that fails (or that the hand check cannot decide)

    return jsonschema.Draft202012Validator(schema).iter_errors(data)


def valid(schema: dict, data, root: dict | None = None) -> bool:
    """Whether `data` is valid under `schema` as jsonschema's Draft202012Validator judges it;
    raises Unsure where that cannot be decided here (see the module doc)."""
    root = schema if root is None else root
    if schema is True:
        return True
    if schema is False:
        return False
    if not isinstance(schema, dict):
        raise Unsure("a schema that is not an object")
    t = type(data)
    if t not in (dict, list, str, int, float, bool, type(None)):
        raise Unsure(f"a {t.__name__} value")
    for key, want in schema.items():
        if key in _ANNOTATIONS:
            continue
        check = _KEYWORDS.get(key)
        if check is None:
            raise Unsure(f"keyword {key}")
        if not check(want, data, schema, root):
            return False
    return True


def _is_type(name: str, x) -> bool:
    t = type(x)
    if name == "object":
        return t is dict
    if name == "array":
        return t is list
    if name == "string":
        return t is str
    if name == "integer":
        return t is int or t is float and x.is_integer()
    if name == "number":
        return t is int or t is float
    if name == "boolean":
        return t is bool
    if name == "null":
        return x is None
    raise Unsure(f"type {name}")


def _type(want, x, _s, _r) -> bool:
    return any(_is_type(n, x) for n in want) if isinstance(want, list) else _is_type(want, x)


def _keys(x: dict) -> dict:
    if any(type(k) is not str for k in x):
        raise Unsure("a key that is not a string")
    return x


def _properties(want: dict, x, _s, root) -> bool:
    if type(x) is not dict:
        return True
    return all(valid(sub, x[k], root) for k, sub in want.items() if k in _keys(x))


def _additional(want, x, s, root) -> bool:
    if type(x) is not dict:
        return True
    if "patternProperties" in s:
        raise Unsure("patternProperties")
    known = s.get("properties", {})
    extra = [k for k in _keys(x) if k not in known]
    return all(valid(want, x[k], root) for k in extra)


def _required(want: list, x, _s, _r) -> bool:
    return type(x) is not dict or all(k in x for k in want)


def _min_properties(want: int, x, _s, _r) -> bool:
    return type(x) is not dict or len(x) >= want


def _items(want, x, s, root) -> bool:
    if "prefixItems" in s:
        raise Unsure("prefixItems")
    return type(x) is not list or all(valid(want, v, root) for v in x)


def _min_items(want: int, x, _s, _r) -> bool:
    return type(x) is not list or len(x) >= want


def _unique(want: bool, x, _s, _r) -> bool:
    if not want or type(x) is not list:
        return True
    if any(type(v) is not str for v in x):
        raise Unsure("uniqueItems over values other than strings")  # 1 == 1.0, True != 1: jsonschema's rules
    return len(set(x)) == len(x)


_SCALARS = (str, int, float, bool, type(None))


def _same(a, b) -> bool:
    """jsonschema's equality (`_utils.equal`) of two scalars: strings by value, a boolean equal
    only to itself (True is not 1), numbers by value (1 == 1.0). Containers: Unsure."""
    if type(a) not in _SCALARS or type(b) not in _SCALARS:
        raise Unsure("enum or const over arrays or objects")
    if a is b:
        return True
    if type(a) is str or type(b) is str:
        return a == b
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    return a == b


def _enum(want: list, x, _s, _r) -> bool:
    return any(_same(e, x) for e in want)


def _const(want, x, _s, _r) -> bool:
    return _same(want, x)


@lru_cache(maxsize=256)
def _regex(pattern: str):
    return re.compile(pattern)


def _pattern(want: str, x, _s, _r) -> bool:
    return type(x) is not str or _regex(want).search(x) is not None


def _min_length(want: int, x, _s, _r) -> bool:
    return type(x) is not str or len(x) >= want


def _max_length(want: int, x, _s, _r) -> bool:
    return type(x) is not str or len(x) <= want


def _number(x) -> bool:
    return type(x) is int or type(x) is float


def _minimum(want, x, _s, _r) -> bool:
    return not _number(x) or not x < want


def _maximum(want, x, _s, _r) -> bool:
    return not _number(x) or not x > want


def _one_of(want: list, x, _s, root) -> bool:
    return sum(1 for sub in want if valid(sub, x, root)) == 1


def _ref(want: str, x, _s, root) -> bool:
    if not want.startswith("#/"):
        raise Unsure(f"$ref {want}")
    node = root
    for part in want[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise Unsure(f"$ref {want}")
        node = node[part]
    return valid(node, x, root)


_KEYWORDS = {
    "type": _type, "properties": _properties, "additionalProperties": _additional, "required": _required,
    "minProperties": _min_properties, "items": _items, "minItems": _min_items, "uniqueItems": _unique,
    "enum": _enum, "const": _const, "pattern": _pattern, "minLength": _min_length, "maxLength": _max_length,
    "minimum": _minimum, "maximum": _maximum, "oneOf": _one_of, "$ref": _ref,
}
