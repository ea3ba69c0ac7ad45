"""The typed reading of a MaxMind database: geoip2's Reader and models, for records read whole.

Where each reading is used, and why:
- `egress-agent lookup` (one record per address, read whole and shown) reads MaxMind editions
  (GeoIP2/GeoLite2 Country, City, Enterprise, ISP, ASN) through `geoip2.database.Reader` and its
  typed models, the library's documented interface: `fields_from_model` maps a model to Location
  fields. Other vendors' layouts (IPinfo lite's `country_code`/`asn`, anything geoip2 has no model
  for) have no typed reading and are read raw.
- Every judged flow (the daemon, audit, inventory) reads raw records through `maxminddb`, the
  reader under geoip2 (`agent.enrich.geoip._Db`): a typed model costs an object per record and per
  nested record, measured at several times the raw read (`bench/bench_geoip_read.py` prints both),
  and one raw path serves every vendor's layout.
tests/enrich/test_geoip_typed.py holds the two readings equal on every network of City, Country,
Enterprise, ISP and ASN databases built in the test.
"""

from __future__ import annotations

# database_type substring -> geoip2 Reader method (first match wins: "Enterprise" before "City")
_METHODS = (("Enterprise", "enterprise"), ("City", "city"), ("Country", "country"), ("ISP", "isp"),
            ("ASN", "asn"))


def method_for(database_type: str) -> str | None:
    """The geoip2 Reader method that reads this edition, or None (no typed model: read raw)."""
    for part, method in _METHODS:
        if part in database_type:
            return method
    return None


def _iso(rec) -> str | None:
    code = getattr(rec, "iso_code", None)
    return code.upper() if isinstance(code, str) and code else None


def fields_from_model(model) -> dict:
    """Location fields of a geoip2 model: what `geoip.fields_from_record` makes of the raw record."""
    traits = getattr(model, "traits", None)
    country = _iso(getattr(model, "country", None))
    continent = getattr(getattr(model, "continent", None), "code", None)
    in_eu = None
    if country is not None:
        in_eu = bool(model.country.is_in_european_union)
    asn = getattr(model, "autonomous_system_number", None)
    org = getattr(model, "autonomous_system_organization", None)
    if traits is not None:
        asn = asn or getattr(traits, "autonomous_system_number", None)
        org = org or getattr(traits, "autonomous_system_organization", None)
    return {
        "country": country,
        "registered_country": _iso(getattr(model, "registered_country", None)),
        "represented_country": _iso(getattr(model, "represented_country", None)),
        "continent": continent or None,
        "in_eu": in_eu,
        "anycast": bool(getattr(traits, "is_anycast", False)) if traits is not None else False,
        "asn": asn if isinstance(asn, int) else None,
        "as_org": org or None,
    }


class TypedReader:
    """geoip2's Reader over a database file; `fields(ip)` -> (prefix length, fields or None)."""

    def __init__(self, path: str, database_type: str):
        import geoip2.database  # here: ~100 ms of imports only `lookup` with a database needs

        self.method = method_for(database_type)
        self.reader = geoip2.database.Reader(path) if self.method else None

    def fields(self, ip: str) -> tuple[int, dict | None] | None:
        """None when this edition has no typed model (the caller reads raw)."""
        if self.reader is None:
            return None
        from geoip2.errors import AddressNotFoundError

        try:
            model = getattr(self.reader, self.method)(ip)
        except AddressNotFoundError as e:
            return (e.network.prefixlen if e.network is not None else 0), None
        net = model.network if hasattr(model, "network") and not hasattr(model, "traits") else model.traits.network
        return net.prefixlen, fields_from_model(model)

    def close(self):
        if self.reader is not None:
            self.reader.close()
