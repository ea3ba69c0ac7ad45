import os

import pytest

from agent.enrich.geoip import Locator
from agent.enrich.scope import Scoper
from agent.errors import UserError
from tests.helpers import build_city_mmdb

DOC = Scoper(public_nets=["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"])

EDGE = {
    "198.51.100.0/28": {"country": "DE"},
    "198.51.100.16/28": {"registered": "FR"},
    "198.51.100.32/28": {"continent": "EU"},
    "198.51.100.48/28": {"country": "PH", "represented": "US"},
    "198.51.100.64/28": {"country": "US", "anycast": True},
    "198.51.100.80/28": {"anycast": True},  # anycast with no place in the record at all
    "203.0.113.0/24": {"country": "US"},
}


@pytest.fixture
def edge_db(tmp_path):
    return build_city_mmdb(tmp_path / "edge.mmdb", EDGE)


def test_fields_and_provenance(city_db, asn_db):
    loc = Locator([city_db, asn_db], DOC).locate("198.51.100.7")
    assert (loc.country, loc.in_eu, loc.asn, loc.as_org) == ("DE", True, 24940, "Hetzner Online GmbH")
    assert loc.unknown_reason is None and loc.source == "GeoIP2-City"
    assert [p[0] for p in loc.provenance] == ["GeoIP2-City", "GeoLite2-ASN"]


@pytest.mark.parametrize("ip,reason", [
    ("198.51.100.1", None),
    ("198.51.100.17", "registered-country-only"),
    ("198.51.100.33", "continent-only"),
    ("198.51.100.65", "anycast"),
    ("198.51.100.81", "anycast"),
    ("198.51.100.200", "no-record"),
    ("10.0.0.1", "not-public"),
])
def test_unknown_is_an_answer(edge_db, ip, reason):
    assert Locator([edge_db], DOC).locate(ip).unknown_reason == reason


def test_represented_country(edge_db):
    loc = Locator([edge_db], DOC).locate("198.51.100.49")
    assert (loc.country, loc.represented_country) == ("PH", "US")


def test_nat64_and_6to4_look_up_the_embedded_ipv4(edge_db):
    loc = Locator([edge_db], DOC).locate("64:ff9b::cb00:7109")  # 203.0.113.9
    assert (loc.country, loc.lookup_ip, loc.scope) == ("US", "203.0.113.9", "public")
    assert Locator([edge_db], DOC).locate("2002:cb00:7109::1").country == "US"


def test_embedded_rir_data_without_database():
    loc = Locator([], Scoper()).locate("8.8.8.8")
    # registration, not location (issue 9): the country stays unknown, the registration is reported
    assert loc.country is None and loc.registered_country == "US" and loc.source == "rir-registration"
    assert loc.unknown_reason == "registered-country-only"
    assert Locator([], Scoper()).provenance()[0]["database_type"].startswith("iptocc")
    # documentation space has no registration: unknown, not a guess
    assert Locator([], DOC).locate("203.0.113.5").unknown_reason == "no-record"


def test_cache_is_bounded_and_dropped_when_the_file_changes(tmp_path):
    path = build_city_mmdb(tmp_path / "g.mmdb", {"203.0.113.0/24": {"country": "US"}})
    loc = Locator([path], DOC, cache_size=4)
    assert loc.locate("203.0.113.1").country == "US"
    for i in range(10):
        loc.locate(f"203.0.113.{i}")
    assert 0 < len(loc._cache) <= 4
    new = build_city_mmdb(tmp_path / "new.mmdb", {"203.0.113.0/24": {"country": "DE"}})
    os.replace(new, path)  # what geoipupdate does: a new inode
    assert loc.refresh() is True
    assert loc.locate("203.0.113.1").country == "DE"
    assert loc.refresh() is False


def test_missing_and_corrupt_databases(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Locator([str(tmp_path / "none.mmdb")])
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="not a readable MaxMind-format database"):
        Locator([str(bad)])


def test_ipinfo_lite_layout(tmp_path):
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="ipinfo lite.mmdb")
    w.insert_network(IPSet(["203.0.113.0/24"]), {"country_code": "SG", "continent_code": "AS",
                                                  "asn": "AS64500", "as_name": "Example"})
    w.to_db_file(str(tmp_path / "ipinfo.mmdb"))
    loc = Locator([str(tmp_path / "ipinfo.mmdb")], DOC).locate("203.0.113.1")
    assert (loc.country, loc.continent, loc.asn, loc.as_org) == ("SG", "AS", 64500, "Example")


def test_corrupt_record_is_an_explicit_unknown_not_a_crash(tmp_path, monkeypatch):
    import maxminddb

    path = build_city_mmdb(tmp_path / "g.mmdb", {"203.0.113.0/24": {"country": "US"}})
    loc = Locator([path], DOC)

    class Broken:
        def get_with_prefix_len(self, ip):
            raise maxminddb.InvalidDatabaseError("bad data section")

    monkeypatch.setattr(loc.dbs[0], "reader", Broken())
    got = loc.locate("203.0.113.1")
    assert got.unknown_reason == "database-error" and loc.errors == 1
    assert "corrupt record for 203.0.113.1" in loc.warnings[0]


def test_teredo_is_located_by_its_client_not_the_relay(edge_db):
    # client 198.51.100.1 obfuscated (XOR 0xffffffff) in the last 32 bits; relay 203.0.113.1 (US)
    loc = Locator([edge_db], DOC).locate("2001:0:cb00:7101::39cc:9bfe")
    assert loc.lookup_ip == "198.51.100.1" and loc.country == "DE"


def test_a_broken_replacement_keeps_the_previous_database(tmp_path):
    """A half-copied or corrupt file: the running locator keeps answering and says why, then retries."""
    path = build_city_mmdb(tmp_path / "geo.mmdb")
    good = open(path, "rb").read()
    loc = Locator([path], DOC)
    assert loc.locate("203.0.113.9").country == "US"
    with open(path, "wb") as f:  # a non-atomic `cp`: same inode, cut short
        f.write(good[: len(good) // 2])
    assert loc.refresh() is False
    assert "not a readable MaxMind-format database" in loc.refresh_error
    assert loc.locate("198.51.100.7").country == "DE"  # still the previous copy, no SIGBUS
    open(path, "wb").write(b"\x00" * 100)
    assert loc.refresh() is False and loc.refresh_error
    open(path, "wb").write(good)  # the copy completes: picked up on the next check
    os.utime(path, ns=(1, 1))
    assert loc.refresh() is True and loc.refresh_error is None
    assert loc.locate("203.0.113.9").country == "US"


def test_database_truncated_in_place_under_the_reader(tmp_path):
    """The reader maps a private copy: truncating the file under it cannot raise SIGBUS."""
    path = build_city_mmdb(tmp_path / "geo.mmdb")
    loc = Locator([path], DOC)
    os.truncate(path, 0)
    assert loc.locate("198.51.100.200").country == "JP"


def test_startup_with_a_broken_database_is_a_user_error(tmp_path):
    p = tmp_path / "half.mmdb"
    p.write_bytes(b"\xab\xcd\xefMaxMind.com" + b"\x00" * 50)
    with pytest.raises(UserError, match="not a readable MaxMind-format database"):
        Locator([str(p)])


def test_network_cache_answers_as_a_fresh_lookup(tmp_path, monkeypatch):
    """Addresses in a network looked up before are answered from the remembered network; with two
    databases of different granularity that must be their narrowest network, else a neighbour's
    country or ASN leaks in. Every answer equals a lookup with the cache off."""
    import ipaddress
    import random

    from tests.helpers import build_asn_mmdb

    rnd = random.Random(12)
    countries = ["DE", "FR", "US", "CN", "JP", "BR"]
    city, asn = {}, {}
    for base, bits in (("198.51.100.0", 32), ("203.0.113.0", 32), ("2001:db8::", 128)):
        top = int(ipaddress.ip_address(base))
        host_bits = 8 if bits == 32 else 96  # inside the documentation block
        for _ in range(40):  # nested and neighbouring networks; later ones split earlier ones
            plen = rnd.randint(bits - host_bits, bits - 1)
            net = ipaddress.ip_network((top + (rnd.getrandbits(host_bits) >> (bits - plen) << (bits - plen)), plen))
            city[str(net)] = {"country": rnd.choice(countries)}
            plen = rnd.randint(bits - host_bits, bits - 1)
            net = ipaddress.ip_network((top + (rnd.getrandbits(host_bits) >> (bits - plen) << (bits - plen)), plen))
            asn[str(net)] = {"asn": rnd.randint(1, 65000), "org": "AS test"}
    dbs = [build_city_mmdb(tmp_path / "city.mmdb", city), build_asn_mmdb(tmp_path / "asn.mmdb", asn)]
    cached, fresh = Locator(dbs, DOC), Locator(dbs, DOC)
    monkeypatch.setattr(fresh, "_network_hit", lambda version, n: None)
    addrs = [str(ipaddress.ip_address(int(ipaddress.ip_address(b)) + rnd.getrandbits(h)))
             for _ in range(3000) for b, h in (("198.51.100.0", 8), ("203.0.113.0", 8), ("2001:db8::", 96))]
    addrs += [f"64:ff9b::{a}" for a in addrs[:300:3]]  # NAT64: the embedded IPv4 address is looked up
    rnd.shuffle(addrs)
    for a in addrs:
        assert cached.locate(a) == fresh.locate(a), a
    assert sum(len(s) for s, _, _ in cached._nets.values()) < len(set(addrs)) / 2  # the cache did answer
    cached.clear()
    assert cached._nets[4] == ([], [], []) and not cached._cache


def test_embedded_data_in_bulk_equals_one_lookup_at_a_time():
    """Without a database, `locate_many` asks iptocc once for all addresses and shares one Location
    per registered country; each address's Location equals `locate`'s apart from `ip`, NAT64 and
    unregistered addresses included."""
    import dataclasses
    import ipaddress
    import random

    from agent.enrich.scope import ip_int

    rnd = random.Random(3)
    addrs = {str(ipaddress.IPv4Address(rnd.randrange(1 << 24, 223 << 24))) for _ in range(3000)}
    addrs |= {"8.8.8.8", "193.99.144.80", "64:ff9b::808:808", "2a00:1450:4001:80b::200e", "2001:4860::8888"}
    scoper = Scoper()
    public = [a for a in addrs if scoper.scope_int(*ip_int(a)) == "public"]
    order = sorted(public, key=lambda a: (ip_int(a)[0], ip_int(a)[1]))
    ints = [ip_int(a)[1] for a in order]
    v4 = [ip_int(a)[0] == 4 for a in order]
    bulk = Locator([], scoper)
    cls, locs = bulk.locate_many(ints, v4, order)
    one = Locator([], Scoper())
    for a, c in zip(order, cls, strict=True):
        want = one.locate(a)
        assert dataclasses.replace(locs[c], ip=a) == want, a
    assert len(locs) < len(order) / 5  # shared per country, not one per address
