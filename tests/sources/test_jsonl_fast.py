"""The fast JSON-lines paths give what the reference paths give (acceptance, values, spelling)."""

import ipaddress
import random

import pytest

from agent.sources.jsonl import canonical_ip, loads, strict_loads


def _reference(v):
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        return ValueError


def test_canonical_ip_equals_ipaddress():
    rnd = random.Random(9)
    cases = ["01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "::1.2.3.4", "::", "::1", "fe80::1%eth0", "FE80::A",
             "1:0:0:2::", "2001:db8::1.2.3.4", " 1.2.3.4", "1.2.3.256", "", "x", "1::2::3"]
    for _ in range(3000):
        n = rnd.getrandbits(128) >> rnd.choice((0, 16, 48, 80, 96, 112))
        cases += [str(ipaddress.IPv6Address(n)), ipaddress.IPv6Address(n).exploded.upper(),
                  str(ipaddress.IPv4Address(n & 0xFFFFFFFF))]
    for v in cases:
        want = _reference(v)
        if want is ValueError:
            with pytest.raises(ValueError):
                canonical_ip(v)
        else:
            assert canonical_ip(v) == want, v


@pytest.mark.parametrize("raw", [
    b'{"a": 1, "b": [1.5, -2, "x\\u00e9"], "c": null, "d": true}', b'{"a": 1, "a": 2}', b'[18446744073709551615]',
    b'{"n": 123456789012345678901}', b'[1e999]', b'{"t": NaN}', b'[Infinity]', b'"\\ud800"', b'[' * 3000 + b']' * 3000,
    b'{"x": "\xff"}', b'{"k": 1} trailing', b'', b'  {"sp": 1}  \n',
])
def test_loads_equals_strict_loads(raw):
    def outcome(fn):
        try:
            return ("ok", fn(raw))
        except RecursionError:
            return ("recursion", None)
        except ValueError as e:
            return ("error", type(e).__name__ if not isinstance(e, UnicodeDecodeError) else "unicode")

    a, b = outcome(loads), outcome(strict_loads)
    assert a[0] == b[0] and (a[0] != "ok" or a[1] == b[1]), (a, b)
