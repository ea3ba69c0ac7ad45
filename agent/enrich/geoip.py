"""Where a public address is: MaxMind-format databases, or the embedded RIR data.

Contract: `Locator(paths, scoper).locate(ip) -> Location`, pure apart from bounded caches (per
address, and per database network: an address inside a network looked up before needs no read)
that are dropped when any database file changes (`refresh()` checks inode/mtime/size).

Records of judged flows are read through `maxminddb` (the reader under `geoip2`) as plain dicts
rather than geoip2's typed models (several times cheaper per record; `agent.enrich.geoip_typed`
says where the typed reading is used instead, and tests hold both equal), and one code path then
serves every vendor's layout: MaxMind GeoIP2 /
GeoLite2 Country, City, Enterprise, ISP and ASN; DB-IP lite (MaxMind layout); IPinfo lite
(`country_code`, `continent_code`, `asn`, `as_name`). Without any database the embedded `iptocc`
data answers with the RIR *registration* country, and says so (`source: rir-registration`).

Unknown is an answer, never a silent pass: `unknown_reason` is one of
`no-record`, `registered-country-only`, `continent-only`, `anycast`, `not-public`,
`database-error` (a corrupt record: counted in `errors`, described in `warnings`).
"""

from __future__ import annotations

import functools
import os
from bisect import bisect_left, bisect_right
from dataclasses import fields
from datetime import UTC, datetime
from socket import AF_INET as _AF4
from socket import inet_ntop as _ntop

from agent.enrich.scope import Scoper, embedded_int, ip_int
from agent.errors import UserError
from agent.fileio import open_regular
from agent.flow import Location

CACHE_SIZE = 65536
NETWORK_CACHE = 65536  # database networks remembered per IP version (see Locator._remember_network)
_LOCATED_FIELDS = tuple(f.name for f in fields(Location))[3:]  # after ip, scope, lookup_ip
# RIR pseudo-codes that name a region, not a country.
_REGION_CODES = {"EU", "AP"}
_MISSING = object()
REGISTRATION_SOURCE = "rir-registration"  # Location.source of the embedded data


def _iso(d) -> str | None:
    if isinstance(d, dict):
        code = d.get("iso_code")
        return code.upper() if isinstance(code, str) and code else None
    return None


def _asn(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.upper().startswith("AS") and value[2:].isdigit():
        return int(value[2:])
    return None


def fields_from_record(rec: dict) -> dict:
    """Normalise one database record (any supported vendor layout) to Location fields."""
    traits = rec.get("traits") if isinstance(rec.get("traits"), dict) else {}
    country = _iso(rec.get("country")) or (rec.get("country_code") or None)
    continent = (rec.get("continent") or {}).get("code") if isinstance(rec.get("continent"), dict) else None
    continent = continent or rec.get("continent_code")
    in_eu = None
    if isinstance(rec.get("country"), dict) and "is_in_european_union" in rec["country"]:
        in_eu = bool(rec["country"]["is_in_european_union"])
    elif country:
        in_eu = False if isinstance(rec.get("country"), dict) else None
    asn = _asn(rec.get("autonomous_system_number") or traits.get("autonomous_system_number") or rec.get("asn"))
    org = (rec.get("autonomous_system_organization") or traits.get("autonomous_system_organization")
           or rec.get("as_name"))
    return {
        "country": country.upper() if isinstance(country, str) else None,
        "registered_country": _iso(rec.get("registered_country")),
        "represented_country": _iso(rec.get("represented_country")),
        "continent": continent,
        "in_eu": in_eu,
        "anycast": bool(traits.get("is_anycast") or rec.get("is_anycast")),
        "asn": asn,
        "as_org": org,
    }


def unknown_reason(f: dict) -> str | None:
    """Why a located record still does not tell the country, or None when it does."""
    if f.get("anycast"):
        return "anycast"
    country = f.get("country")
    if country and country not in _REGION_CODES:
        return None
    if f.get("registered_country"):
        return "registered-country-only"
    if f.get("continent") or country in _REGION_CODES:
        return "continent-only"
    return "no-record"


class CorruptRecord(Exception):
    """One lookup hit bad data in an otherwise readable database."""


MAX_DB_BYTES = 1 << 30


def _private_copy(path: str) -> tuple[int, os.stat_result]:
    """An anonymous in-memory copy of the file (memfd), and the source's stat at open time."""
    src, st = open_regular(path, "GeoIP database")
    try:
        if st.st_size > MAX_DB_BYTES:
            raise OSError(f"larger than {MAX_DB_BYTES >> 20} MiB")
        fd = os.memfd_create("egress-agent-geoip", os.MFD_CLOEXEC)
        try:
            copied = 0
            while True:
                n = os.sendfile(fd, src, None, 1 << 24)
                if n == 0:
                    break
                copied += n
                if copied > MAX_DB_BYTES:
                    raise OSError("grew past the size limit while being read")
        except BaseException:
            os.close(fd)
            raise
        return fd, st
    finally:
        os.close(src)


class _Db:
    def __init__(self, path: str, typed: bool = False):
        """`typed`: read MaxMind editions through geoip2's models (`geoip_typed`; `lookup`), not raw."""
        import maxminddb

        self.path = path
        self.typed = None
        try:
            fd, st = _private_copy(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read GeoIP database ({e.strerror or e})") from None
        try:
            # The reader maps our private copy, never the file itself: geoipupdate or a plain `cp`
            # rewriting the file in place would otherwise truncate pages under the mapping, and the
            # next lookup would kill the process with SIGBUS.
            self.reader = maxminddb.open_database(f"/proc/self/fd/{fd}", maxminddb.MODE_AUTO)  # C reader if built
            if typed:
                from agent.enrich.geoip_typed import TypedReader

                self.typed = TypedReader(f"/proc/self/fd/{fd}", self.reader.metadata().database_type)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as e:
            why = str(e).replace(f"/proc/self/fd/{fd}", path)  # name the user's file, not our private copy
            raise UserError(f"{path}: not a readable MaxMind-format database ({why})") from None
        finally:
            os.close(fd)
        meta = self.reader.metadata()
        self.database_type = meta.database_type
        self.build_date = datetime.fromtimestamp(meta.build_epoch, tz=UTC).strftime("%Y-%m-%d")
        self.build_epoch = meta.build_epoch
        self.ip_version = meta.ip_version
        self.stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._fields: dict[tuple, dict | None] = {}

    def fields(self, version: int, n: int, ip: str) -> tuple[tuple, dict | None]:
        """(network key, `fields_from_record` of the record) for an address given three ways.

        Records are per network: the fields are derived once per network the database returns
        (keyed by prefix length and network bits), not once per address.
        """
        import maxminddb

        if self.ip_version == 4 and version == 6:
            return (), None
        if self.typed is not None:
            try:
                got = self.typed.fields(ip)
            except (maxminddb.InvalidDatabaseError, ValueError, TypeError) as e:
                raise CorruptRecord(f"{self.path}: corrupt record for {ip} ({e})") from None
            if got is not None:
                plen, hit = got
                return (version, plen, n >> ((32 if version == 4 else 128) - plen)), hit
        try:
            rec, plen = self.reader.get_with_prefix_len(ip)
        except (maxminddb.InvalidDatabaseError, ValueError) as e:
            raise CorruptRecord(f"{self.path}: corrupt record for {ip} ({e})") from None
        key = (version, plen, n >> ((32 if version == 4 else 128) - plen))
        hit = self._fields.get(key, _MISSING)
        if hit is _MISSING:
            hit = fields_from_record(rec) if isinstance(rec, dict) else None
            if len(self._fields) >= 262144:
                self._fields.clear()
            self._fields[key] = hit
        return key, hit

    def provenance(self) -> dict:
        return {"path": self.path, "database_type": self.database_type, "build_date": self.build_date,
                "build_epoch": self.build_epoch}


@functools.cache
def _iptocc_version() -> str:
    """The embedded data's version, read once: importlib.metadata parses the package's metadata
    file on every call (~0.75 ms), which per distinct destination was most of a default audit."""
    import iptocc

    # the wheel's dist-info folder beside the package names the version: a directory listing (~0.1 ms)
    # instead of importlib.metadata's search of every path entry (~45 ms of `egress-agent lookup`)
    site = os.path.dirname(os.path.dirname(os.path.abspath(iptocc.__file__)))
    try:
        found = [d for d in os.listdir(site) if d.startswith("iptocc-") and d.endswith(".dist-info")]
    except OSError:
        found = []
    if len(found) == 1:
        return found[0][len("iptocc-"):-len(".dist-info")]
    from importlib import metadata  # here, not at import: ~20 ms an audit with a database never needs

    try:
        return metadata.version("iptocc")
    except metadata.PackageNotFoundError:
        return "unknown"


class Locator:
    """Looks up addresses in the configured databases (or the embedded data), with a cache."""

    def __init__(self, paths=(), scoper: Scoper | None = None, cache_size: int = CACHE_SIZE, typed: bool = False):
        """`typed`: records read through geoip2's typed models where the edition has one
        (`agent.enrich.geoip_typed`: for `lookup`); otherwise raw, the judged flows' path."""
        self.paths = list(paths)
        self.typed = typed
        self.scoper = scoper or Scoper()
        self.cache_size = cache_size
        self._cache: dict[str, Location] = {}
        self.errors = 0  # corrupt records met; each address stays an explicit unknown
        self.warnings: list[str] = []
        self._merged: dict[tuple, tuple] = {}  # database networks -> the Location fields after `lookup_ip`
        self._alike: dict[tuple, tuple] = {}  # what the databases said (their fields' values) -> the same
        self._open()

    def _open(self):
        self.dbs = [_Db(p, self.typed) for p in self.paths]
        self.clear()
        self.refresh_error: str | None = None

    def clear(self):
        """Forget every cached answer (per address, per network, per record)."""
        self._cache.clear()
        self._merged.clear()
        self._alike.clear()
        self._nets: dict[int, tuple[list, list, list]] = {4: ([], [], []), 6: ([], [], [])}

    def provenance(self) -> list[dict]:
        if not self.dbs:
            return [{"path": None, "database_type": "iptocc (embedded RIR registration data)",
                     "build_date": None, "version": _iptocc_version()}]
        return [db.provenance() for db in self.dbs]

    def refresh(self) -> bool:
        """Re-open databases whose file changed (inode, mtime or size). True if the new set is in use.

        A changed file that cannot be opened (half-copied, corrupt, gone) leaves every database as it
        was: `refresh_error` says why, and the next call tries again.
        """
        changed = False
        for db in self.dbs:
            try:
                st = os.stat(db.path)
            except OSError:
                continue  # keep the open copy until a new file appears
            if (st.st_ino, st.st_mtime_ns, st.st_size) != db.stamp:
                changed = True
        if not changed:
            return False
        try:
            dbs = [_Db(p, self.typed) for p in self.paths]
        except UserError as e:
            self.refresh_error = str(e)
            return False
        self.dbs = dbs
        self.clear()
        self.refresh_error = None
        return True

    def locate(self, ip: str) -> Location:
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        loc = self._locate(ip)
        if len(self._cache) >= self.cache_size:
            # emptied, not evicted one by one: with the network cache behind it a miss is cheap,
            # and LRU bookkeeping on every lookup cost more than the misses after a reset
            self._cache.clear()
        self._cache[ip] = loc
        return loc

    def _locate(self, ip: str) -> Location:
        version, n = ip_int(ip)
        scope = self.scoper.scope_int(version, n)
        lv, ln, lookup_ip, lookup = version, n, None, ip
        if version == 6:
            emb = embedded_int(n)
            if emb is not None:
                lv, ln = 4, emb
                lookup = lookup_ip = _ntop(_AF4, emb.to_bytes(4, "big"))
        if scope != "public":
            return Location(ip=ip, scope=scope, lookup_ip=lookup_ip, unknown_reason="not-public")
        if not self.dbs:
            import iptocc

            # RIR delegation data says which country an address is *registered* to, not where it
            # is: reported as such, so each policy's `unknown` (or registration_as_location) decides
            cc = iptocc.country_code(lookup)
            f = {"registered_country": cc.upper() if cc else None}
            return Location(ip=ip, scope=scope, lookup_ip=lookup_ip, registered_country=f["registered_country"],
                            source=REGISTRATION_SOURCE,
                            provenance=(("iptocc " + _iptocc_version(), ""),),
                            unknown_reason=unknown_reason(f))
        hit = self._network_hit(lv, ln)
        if hit is not None:  # in a network looked up before: no database read
            return Location(ip, scope, lookup_ip, *hit)
        keys = []
        for db in self.dbs:
            # The embedded IPv4 address itself, never the database's IPv6 alias: for Teredo,
            # MaxMind's alias resolves the relay server, not the client the data goes to.
            try:
                keys.append(db.fields(lv, ln, lookup))
            except CorruptRecord as e:
                self.errors += 1
                if len(self.warnings) < 20:
                    self.warnings.append(f"{e}; address reported as unknown (database-error)")
                return Location(ip=ip, scope=scope, lookup_ip=lookup_ip, source=db.database_type,
                                provenance=((db.database_type, db.build_date),), unknown_reason="database-error")
        return Location(ip, scope, lookup_ip, *self._found(lv, ln, keys))

    def _found(self, version: int, n: int, keys: list) -> tuple:
        """The located fields of address n from each database's (network key, fields), remembered
        for the network they share."""
        ident = tuple(k for k, _ in keys)
        vals = self._merged.get(ident)
        if vals is None:
            # Networks whose records say the same (most of a country's) share one merge and one
            # tuple: fewer Locations, and memos keyed on the tuple (the fast lane's) hit across them.
            said = tuple(None if f is None else tuple(f.items()) for _, f in keys)
            vals = self._alike.get(said)
            if vals is None:
                kw = self._merge([f for _, f in keys])
                vals = tuple(kw[f] for f in _LOCATED_FIELDS)
                if len(self._alike) >= 65536:
                    self._alike.clear()
                self._alike[said] = vals
            if len(self._merged) >= 262144:
                self._merged.clear()
            self._merged[ident] = vals
        self._remember_network(version, n, ident, vals)
        return vals

    def _located(self, ip: str, version: int, n: int, keys: list) -> Location:
        """`locate` of an address whose databases' (network key, fields) `locate_many` read already:
        the same Location, without reading them again."""
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        if self.scoper.scope_int(version, n) != "public":
            return self.locate(ip)
        loc = Location(ip, "public", None, *self._found(version, n, keys))
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[ip] = loc
        return loc

    def _network_hit(self, version: int, n: int) -> tuple | None:
        """The located fields of a network already looked up that holds address `n`, or None."""
        starts, ends, vals = self._nets[version]
        i = bisect_right(starts, n) - 1
        return vals[i] if i >= 0 and n <= ends[i] else None

    def _remember_network(self, version: int, n: int, ident: tuple, vals: tuple):
        """Remember the range every database answers alike for `n`: the narrowest of the networks
        they returned (prefixes that hold one address nest, so that is their intersection). Ranges
        never overlap: each is the narrowest answer for an address no remembered range held, and
        two answers of one database never nest."""
        span = (32 if version == 4 else 128) - max((k[1] for k in ident if k), default=0)
        start = n >> span << span
        starts, ends, cached = self._nets[version]
        if len(starts) >= NETWORK_CACHE:
            starts.clear(), ends.clear(), cached.clear()
        i = bisect_right(starts, start)
        starts.insert(i, start)
        ends.insert(i, start | ((1 << span) - 1))
        cached.insert(i, vals)

    def _registered_many(self, ints: list[int], v4: list[bool], texts) -> tuple[list[int], list[Location]]:
        """`locate_many` on the embedded registration data: one batch call into iptocc for every
        address, one class per registered country (an embedded-IPv4 form is located on its own,
        as `locate` does). Equal to `locate`, field for field apart from `ip`."""
        import iptocc

        n, n4 = len(ints), sum(v4)
        alone = [False] * n4 + [embedded_int(x) is not None for x in ints[n4:]]
        batch = [i for i in range(n) if not alone[i]]
        codes = iptocc.country_code([texts[i] for i in batch]) if batch else []
        cls, locs, by_cc = [0] * n, [], {}
        prov = (("iptocc " + _iptocc_version(), ""),)
        for i, cc in zip(batch, codes, strict=True):
            k = by_cc.get(cc)
            if k is None:
                reg = cc.upper() if cc else None
                k = by_cc[cc] = len(locs)
                locs.append(Location(ip=texts[i], scope="public", registered_country=reg, source=REGISTRATION_SOURCE,
                                     provenance=prov, unknown_reason=unknown_reason({"registered_country": reg})))
            cls[i] = k
        for i in range(n):
            if alone[i]:
                cls[i] = len(locs)
                locs.append(self.locate(texts[i]))
        return cls, locs

    def locate_many(self, ints: list[int], v4: list[bool], texts) -> tuple[list[int], list[Location]]:
        """`locate` for many public addresses sorted by (version, value): (class per address,
        Locations). Every address of a class has the Location of the class, field for field, apart
        from `ip` (the class's Location is `locate` of its first address). `texts[i]` is address i's
        text (any indexable: only the first address of each class is spelled).

        Why: a database answers with the network that holds an address, and the next sorted addresses
        inside that network have the same record, so they need no lookup of their own: the work is
        per network (run of addresses), not per address. Addresses the bulk form cannot share
        (embedded IPv4, a corrupt record) get `locate` each; without a database, every address does."""
        import numpy as np

        n = len(ints)
        if not self.dbs:
            return self._registered_many(ints, v4, texts)
        n4 = sum(v4)  # IPv4 addresses come first, each version sorted by value
        alone = [False] * n4 + [embedded_int(x) is not None for x in ints[n4:]]
        run_of, run_keys = [], []  # per database: each address's run (-1: alone), each run's network key
        run_found = []  # per database: each run's (network key, fields), as `locate` reads them
        for db in self.dbs:
            r = np.full(n, -1, dtype=np.int64)
            keys: list = []
            found: list = []
            i = 0
            while i < n:
                if alone[i]:
                    i += 1
                    continue
                version, block_end = (4, n4) if i < n4 else (6, n)
                try:
                    key, fields = db.fields(version, ints[i], texts[i])
                except CorruptRecord:
                    alone[i] = True
                    i += 1
                    continue
                if key:
                    span = (32 if version == 4 else 128) - key[1]
                    j = bisect_left(ints, ((ints[i] >> span) + 1) << span, i + 1, block_end)
                else:  # no answer for this version (an IPv4-only database): the same for all of them
                    j = block_end
                r[i:j] = len(keys)
                keys.append(key)
                found.append((key, fields))
                i = j
            run_of.append(r)
            run_keys.append(keys)
            run_found.append(found)
        # segments: stretches of addresses in one run of every database
        lone = np.array(alone, dtype=bool)
        if len(run_of) == 1:
            seg = run_of[0].copy()
        else:
            _, seg = np.unique(np.stack(run_of, axis=1), axis=0, return_inverse=True)
            seg = seg.ravel()
        seg[lone] = -1
        live = np.flatnonzero(~lone)
        firsts, inverse = np.unique(seg[live], return_index=True, return_inverse=True)[1:]
        first_rows = live[firsts].tolist()
        # classes numbered as a scan in address order meets them (segments and lone addresses)
        classes: dict = {}
        locs: list[Location] = []
        seg_class = [0] * len(first_rows)
        lone_rows = np.flatnonzero(lone).tolist()
        lone_class = {}
        events = sorted([(row, k) for k, row in enumerate(first_rows)] + [(row, -1) for row in lone_rows])
        for row, k in events:
            if k < 0:
                lone_class[row] = len(locs)
                locs.append(self.locate(texts[row]))
                continue
            ident = tuple(keys[r[row]] for keys, r in zip(run_keys, run_of, strict=True))
            c = classes.get(ident)
            if c is None:
                c = classes[ident] = len(locs)
                locs.append(self._located(texts[row], 4 if row < n4 else 6, ints[row],
                                          [found[r[row]] for found, r in zip(run_found, run_of, strict=True)]))
            seg_class[k] = c
        out = np.zeros(n, dtype=np.int64)
        out[live] = np.asarray(seg_class, dtype=np.int64)[inverse.ravel()]
        for row, c in lone_class.items():
            out[row] = c
        return out.tolist(), locs

    def _merge(self, found: list[dict | None]) -> dict:
        """Location fields from each database's record: the first with a place wins, ASN from the
        first that has one."""
        geo: dict | None = None
        geo_db = None
        asn: dict | None = None
        for db, f in zip(self.dbs, found, strict=True):
            if f is None:
                continue
            if geo is None and (f["country"] or f["registered_country"] or f["continent"]):
                geo, geo_db = f, db
            if asn is None and f["asn"] is not None:
                asn = f
        f = dict(geo or {})
        if asn is not None:
            f["asn"], f["as_org"] = asn["asn"], asn["as_org"]
        # MaxMind marks anycast networks in traits, often on records with no place at all: keep the
        # marker from any database, so the reason is `anycast`, never `no-record`
        f["anycast"] = any(x and x.get("anycast") for x in found)
        return dict(country=f.get("country") if f.get("country") not in _REGION_CODES else None,
                    registered_country=f.get("registered_country"),
                    represented_country=f.get("represented_country"),
                    continent=f.get("continent"), in_eu=f.get("in_eu"),
                    anycast=bool(f.get("anycast")), asn=f.get("asn"), as_org=f.get("as_org"),
                    source=geo_db.database_type if geo_db else None,
                    provenance=tuple((db.database_type, db.build_date) for db in self.dbs),
                    unknown_reason=unknown_reason(f))


class FixtureLocator:
    """Locations given as data (policy test files): same normalisation, no database."""

    def __init__(self, table: dict[str, dict], scoper: Scoper):
        self.table = table
        self.scoper = scoper

    def locate(self, ip: str) -> Location:
        scope = self.scoper.scope(ip)
        if scope != "public":
            return Location(ip=ip, scope=scope, unknown_reason="not-public")
        f = {"country": None, "registered_country": None, "represented_country": None,
             "continent": None, "in_eu": None, "anycast": False, "asn": None, "as_org": None}
        f.update(self.table.get(ip, {}))
        return Location(ip=ip, scope=scope, source="fixture", unknown_reason=unknown_reason(f),
                        **{k: v for k, v in f.items()})

    def provenance(self) -> list[dict]:
        return [{"path": None, "database_type": "fixture", "build_date": None}]

    def clear(self):
        """Nothing is cached."""
