"""What a record costs read raw (maxminddb, the judged flows' path) against geoip2's typed models
(`lookup`'s path), measured in the same run on the same database and addresses.

Builds a City-layout MMDB of --networks networks (countries, registered countries, ASNs), picks
--lookups addresses inside them, and prints microseconds per lookup for:
  * `maxminddb.Reader.get_with_prefix_len` + `fields_from_record`  (raw: agent.enrich.geoip)
  * `geoip2.database.Reader.city` + `fields_from_model`            (typed: agent.enrich.geoip_typed)
and the ratio typed / raw, which is why the per-flow path stays raw (agent/enrich/geoip_typed.py).
Each reader runs --rounds times, alternating; the best round of each is printed.

    python bench/bench_geoip_read.py [--networks N] [--lookups N] [--rounds N] [--db FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COUNTRIES = ["DE", "FR", "US", "CN", "JP", "GB", "BR", "IN", "NL", "SE", "IT", "ES", "PL", "KR", "AU", "CA"]


def build(path: str, networks: int, rnd: random.Random) -> list[str]:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
    addrs = []
    for i in range(networks):
        net = ipaddress.IPv4Network(((11 << 24) + (i << 8), 24))
        cc, reg = rnd.choice(COUNTRIES), rnd.choice(COUNTRIES)
        w.insert_network(IPSet([str(net)]), {
            "country": {"iso_code": cc, "names": {"en": cc}, "is_in_european_union": cc in ("DE", "FR", "NL")},
            "registered_country": {"iso_code": reg, "names": {"en": reg}},
            "continent": {"code": "EU", "names": {"en": "Europe"}},
            "city": {"names": {"en": f"City {i}"}}, "location": {"latitude": 1.0, "longitude": 2.0},
            "traits": {"autonomous_system_number": 64500 + i % 1000}})
        addrs.append(str(net.network_address + rnd.randrange(1, 255)))
    w.to_db_file(path)
    return addrs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--networks", type=int, default=20000)
    ap.add_argument("--lookups", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", help="an existing City-layout database instead (addresses drawn from its networks)")
    a = ap.parse_args()
    import maxminddb

    from agent.enrich.geoip import fields_from_record
    from agent.enrich.geoip_typed import TypedReader

    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        if a.db:
            path = a.db
            pool = [str(net.network_address) for net, _rec in maxminddb.open_database(path)]
        else:
            path = os.path.join(tmp, "city.mmdb")
            pool = build(path, a.networks, rnd)
        ips = [rnd.choice(pool) for _ in range(a.lookups)]
        raw = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        typed = TypedReader(path, raw.metadata().database_type)

        def run_raw():
            get = raw.get_with_prefix_len
            for ip in ips:
                rec, _plen = get(ip)
                if isinstance(rec, dict):
                    fields_from_record(rec)

        def run_typed():
            for ip in ips:
                typed.fields(ip)

        best = {"raw": float("inf"), "typed": float("inf")}
        for _ in range(a.rounds):
            for name, fn in (("raw", run_raw), ("typed", run_typed)):
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        us = {k: v / len(ips) * 1e6 for k, v in best.items()}
        print(f"database: {raw.metadata().database_type}, {len(pool):,} networks; {len(ips):,} lookups, "
              f"best of {a.rounds}")
        print(f"raw   (maxminddb + fields_from_record): {us['raw']:7.2f} us/lookup")
        print(f"typed (geoip2 model + fields_from_model): {us['typed']:7.2f} us/lookup")
        print(f"typed / raw: {us['typed'] / us['raw']:.1f}x")


if __name__ == "__main__":
    main()
