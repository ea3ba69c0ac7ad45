import ipaddress

import pytest

from agent.enrich.scope import Scoper, embedded_ipv4, registry_scope


@pytest.mark.parametrize("ip,scope", [
    ("8.8.8.8", "public"),
    ("10.1.2.3", "private"), ("172.31.0.1", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "shared"), ("127.0.0.1", "loopback"), ("169.254.1.1", "link-local"),
    ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"), ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"), ("224.0.0.251", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"), ("0.0.0.0", "unspecified"), ("192.0.0.9", "public"),
    ("192.0.0.1", "reserved"), ("192.88.99.1", "reserved"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fd00::1", "private"),
    ("ff02::1", "multicast"), ("2001:db8::1", "documentation"), ("3fff::1", "documentation"),
    ("2a00:1450::1", "public"), ("2001:2::1", "benchmarking"), ("2001:20::1", "public"),
    ("64:ff9b::808:808", "public"), ("64:ff9b::a00:1", "private"), ("64:ff9b:1::808:808", "public"),
    ("64:ff9b:1::a00:1", "private"), ("64:ff9b:1:5::cb00:7109", "documentation"),
    ("::ffff:192.168.0.1", "private"), ("2002:c000:0201::1", "documentation"),
    ("4000::1", "reserved"),
])
def test_registry_scope(ip, scope):
    assert registry_scope(ipaddress.ip_address(ip)) == scope


def test_stdlib_would_get_these_wrong():
    # The reason the registries are explicit: ipaddress calls documentation ranges private.
    assert ipaddress.ip_address("198.51.100.1").is_private
    assert registry_scope(ipaddress.ip_address("198.51.100.1")) == "documentation"


@pytest.mark.parametrize("ip,form,v4", [
    ("::ffff:1.2.3.4", "mapped", "1.2.3.4"),
    ("64:ff9b::102:304", "nat64", "1.2.3.4"),
    ("2002:102:304::1", "6to4", "1.2.3.4"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo", "192.0.2.45"),
    ("64:ff9b:1::102:304", "nat64-local", "1.2.3.4"),
])
def test_embedded_ipv4(ip, form, v4):
    assert embedded_ipv4(ipaddress.ip_address(ip)) == (form, ipaddress.ip_address(v4))


def test_public_and_local_overrides():
    s = Scoper(public_nets=["203.0.113.0/24", "2001:db8::/32"], local_nets=["2001:db8:1::/48"])
    assert s.scope("203.0.113.9") == "public"
    assert s.scope("2001:db8:5::1") == "public"
    assert s.scope("2001:db8:1::5") == "local"
    assert s.is_egress("10.0.0.1", "203.0.113.9")
    assert s.is_egress("2001:db8:1::5", "2001:db8:5::1")
    assert not s.is_egress("203.0.113.9", "10.0.0.1")
    assert not s.is_egress("10.0.0.1", "10.0.0.2")
    assert not s.is_egress("8.8.4.4", "8.8.8.8")  # neither end local


def test_bad_override_is_a_user_error():
    from agent.errors import UserError
    with pytest.raises(UserError, match="local network: 'nope'"):
        Scoper(local_nets=["nope"])


def _reference_scope(s: Scoper, ip: str) -> str:
    """The scope as the definition reads, with `ipaddress` objects: overrides, embedded, registry."""
    addr = ipaddress.ip_address(ip)
    if any(addr in n for n in s.local_nets if n.version == addr.version):
        return "local"
    if any(addr in n for n in s.public_nets if n.version == addr.version):
        return "public"
    if addr.version == 6:
        emb = embedded_ipv4(addr)
        if emb is not None:
            return _reference_scope(s, str(emb[1]))
    return registry_scope(addr)


def _interesting_addresses():
    """Every table boundary ±1 plus random addresses, both families, each embedded form."""
    import random

    rnd = random.Random(7)
    s = Scoper(public_nets=["203.0.113.0/24", "2001:db8::/32", "10.9.0.0/16"],
               local_nets=["2001:db8:1::/48", "198.51.100.128/25", "8.8.8.0/24"])
    out = []
    for version, bits in ((4, 32), (6, 128)):
        for lo, hi, _ in s.ranges(version):
            for n in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1):
                if 0 <= n < 1 << bits:
                    out.append(str(ipaddress.ip_address(n) if version == 4 else ipaddress.IPv6Address(n)))
        out += [str(ipaddress.ip_address(rnd.getrandbits(bits)) if version == 4
                    else ipaddress.IPv6Address(rnd.getrandbits(bits))) for _ in range(2000)]
    for _ in range(2000):
        v4 = rnd.getrandbits(32)
        out += [f"::ffff:{ipaddress.IPv4Address(v4)}", str(ipaddress.IPv6Address((0x64FF9B << 96) | v4)),
                str(ipaddress.IPv6Address((0x2002 << 112) | v4 << 80 | rnd.getrandbits(80))),
                str(ipaddress.IPv6Address((0x20010000 << 96) | rnd.getrandbits(64) << 32 | v4)),
                str(ipaddress.IPv6Address((0x64FF9B0001 << 80) | rnd.getrandbits(48) << 32 | v4))]
    return s, out


def test_integer_tables_equal_the_reference_definition():
    s, addresses = _interesting_addresses()
    for ip in addresses:
        assert s.scope(ip) == _reference_scope(s, ip), ip
    assert len(addresses) > 10000


def test_tables_cover_the_space_without_overlap():
    s = Scoper(public_nets=["203.0.113.0/24"])
    for version, bits in ((4, 32), (6, 128)):
        t = s.ranges(version)
        assert t[0][0] == 0 and t[-1][1] == (1 << bits) - 1
        assert all(a[1] + 1 == b[0] and a[2] != b[2] for a, b in zip(t, t[1:], strict=False))


def test_not_an_address_is_a_value_error():
    with pytest.raises(ValueError):
        Scoper().scope("not-an-ip")


def test_embedded_int_equals_embedded_ipv4():
    from agent.enrich.scope import embedded_int

    _s, addresses = _interesting_addresses()
    for ip in addresses:
        a = ipaddress.ip_address(ip)
        if a.version == 6:
            e = embedded_ipv4(a)
            assert embedded_int(int(a)) == (int(e[1]) if e else None), ip


def test_classify_is_scope_and_accountable_in_one():
    import random

    s = Scoper(public_nets=["198.51.100.0/24", "2001:db8::/32"], local_nets=["192.0.2.0/24", "2001:db8:1::/64"])
    rnd = random.Random(2)
    addrs = ["64:ff9b:1::c000:201", "64:ff9b::c633:6407", "2001::1", "2002:c633:6407::1", "::ffff:198.51.100.7",
             "fe80::1", "127.0.0.1", "8.8.8.8", "2001:db8:1::5", "192.0.2.9", "2001:db8:77::1"]
    addrs += [str(ipaddress.ip_address(rnd.getrandbits(32))) for _ in range(500)]
    addrs += [str(ipaddress.ip_address(rnd.getrandbits(128) >> rnd.choice((0, 64, 96)))) for _ in range(500)]
    for a in addrs:
        assert s.classify(a) == (s.scope(a), s.accountable(a)), a
    assert {s.classify(a)[1] for a in addrs} == {True, False}
