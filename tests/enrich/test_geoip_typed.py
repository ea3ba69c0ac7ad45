"""geoip2's typed reading equals the raw reading the judged flows use, on every network of MaxMind
editions built here (City, Country, Enterprise with anycast and represented countries, ISP, ASN)."""

import json

import maxminddb
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from agent.enrich.geoip import Locator, fields_from_record
from agent.enrich.geoip_typed import TypedReader, method_for
from tests.helpers import DOC_LOCATIONS, build_asn_mmdb, build_city_mmdb

LOCATIONS = {**DOC_LOCATIONS,
             "198.51.100.64/26": {"country": "FR", "represented": "US", "asn": 64500, "org": "Example Org"},
             "203.0.113.224/28": {"country": "DE", "anycast": True},
             "2001:db8:99::/48": {"registered": "CN"}}


def _isp(path):
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-ISP", languages=["en"])
    for cidr, spec in LOCATIONS.items():
        if spec.get("asn"):
            w.insert_network(IPSet([cidr]), {"autonomous_system_number": spec["asn"],
                                             "autonomous_system_organization": spec.get("org", ""),
                                             "isp": spec.get("org", ""), "organization": spec.get("org", "")})
    w.to_db_file(str(path))
    return str(path)


EDITIONS = {
    "GeoIP2-City": lambda p: build_city_mmdb(p, LOCATIONS, "GeoIP2-City"),
    "GeoLite2-Country": lambda p: build_city_mmdb(p, LOCATIONS, "GeoLite2-Country"),
    "GeoIP2-Enterprise": lambda p: build_city_mmdb(p, LOCATIONS, "GeoIP2-Enterprise"),
    "GeoIP2-ISP": _isp,
    "GeoLite2-ASN": lambda p: build_asn_mmdb(p, LOCATIONS),
}


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_every_network_reads_the_same_both_ways(tmp_path, edition):
    path = EDITIONS[edition](tmp_path / f"{edition}.mmdb")
    raw = maxminddb.open_database(path)
    assert method_for(raw.metadata().database_type) is not None
    typed = TypedReader(path, raw.metadata().database_type)
    seen = 0
    for net, rec in raw:
        for ip in (net.network_address, net.broadcast_address):
            assert typed.fields(str(ip)) == (net.prefixlen, fields_from_record(rec)), (edition, net)
        seen += 1
    assert seen >= 3
    # an address no network holds: no record either way, with the same prefix length
    plen, none = typed.fields("192.0.2.1")
    assert none is None and raw.get_with_prefix_len("192.0.2.1") == (None, plen)


def test_lookup_reads_typed_and_says_the_same_as_the_judged_path(cli, tmp_path):
    city = build_city_mmdb(tmp_path / "city.mmdb", LOCATIONS)
    asn = build_asn_mmdb(tmp_path / "asn.mmdb", LOCATIONS)
    addrs = ["198.51.100.7", "198.51.100.70", "203.0.113.230", "203.0.113.200", "2001:db8:99::1", "192.0.2.9"]
    r = cli("lookup", "--format", "json", "--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24",
            "--public-net", "2001:db8::/32", "--geoip-db", city, "--geoip-db", asn, *addrs)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    from agent.enrich.scope import Scoper

    raw = Locator([city, asn], Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]))
    typed = Locator([city, asn], raw.scoper, typed=True)
    assert all(d.typed is not None for d in typed.dbs) and all(d.typed is None for d in raw.dbs)
    for row, ip in zip(rows, addrs, strict=True):
        a, b = raw.locate(ip), typed.locate(ip)
        assert a == b, ip
        assert (row["country"], row["represented_country"], row["anycast"], row["asn"], row["unknown_reason"]) == \
            (a.country, a.represented_country, a.anycast, a.asn, a.unknown_reason)
    assert rows[1]["represented_country"] == "US" and rows[2]["anycast"] and rows[4]["unknown_reason"] == \
        "registered-country-only"


def test_an_edition_without_a_typed_model_is_read_raw(tmp_path):
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="ipinfo_lite.mmdb", languages=["en"])
    w.insert_network(IPSet(["198.51.100.0/24"]), {"country_code": "DE", "continent_code": "EU", "asn": "AS64500",
                                                   "as_name": "Example"})
    w.to_db_file(str(tmp_path / "ipinfo.mmdb"))
    from agent.enrich.scope import Scoper

    typed = Locator([str(tmp_path / "ipinfo.mmdb")], Scoper(public_nets=["198.51.100.0/24"]), typed=True)
    assert typed.dbs[0].typed.reader is None
    loc = typed.locate("198.51.100.7")
    assert (loc.country, loc.asn, loc.as_org) == ("DE", 64500, "Example")
