"""Write agent/sinks/assets/world.geojson, the country shapes of the HTML report's map.

Why a file in the package: plotly's own geo charts fetch their world outlines from a CDN when the
page opens, and a report must open with no network. The shapes are Natural Earth's 1:110m Admin 0
countries (public domain, naturalearthdata.com), as the `naturalearth_lowres` data set that
geopandas 0.14 shipped in its wheel from PyPI. This script is run once by a developer, never at
run time or in tests:

    pip download --no-deps geopandas==0.14.4 pyshp pycountry -d /tmp/ne
    (cd /tmp/ne && unzip -o geopandas-0.14.4-py3-none-any.whl 'geopandas/datasets/*')
    PYTHONPATH=<pyshp and pycountry unpacked> python tools/make_world_geojson.py \
        /tmp/ne/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp

Each feature carries `iso2` (ISO 3166-1 alpha-2, the codes verdicts use) and `name`; coordinates
are rounded to 0.01 degree, which is finer than the 1:110m source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "agent" / "sinks" / "assets" / "world.geojson"
# Natural Earth marks a few countries -99 in ISO_A3 (disputed or special): by name instead.
BY_NAME = {"France": "FR", "Norway": "NO", "Kosovo": "XK", "N. Cyprus": "CY", "Somaliland": "SO"}


def main(shp: str):
    import pycountry
    import shapefile

    r = shapefile.Reader(shp)
    fields = [f[0] for f in r.fields[1:]]
    features = []
    for sr in r.iterShapeRecords():
        rec = dict(zip(fields, sr.record, strict=True))
        iso3, name = rec.get("iso_a3"), rec.get("name")
        c = pycountry.countries.get(alpha_3=iso3) if iso3 and iso3 != "-99" else None
        iso2 = c.alpha_2 if c else BY_NAME.get(name)
        if iso2 is None:
            print(f"skipped {name} ({iso3})", file=sys.stderr)
            continue
        geo = sr.shape.__geo_interface__

        def ring(points, exterior: bool):
            # d3-geo (plotly.js) reads a ring's winding on the sphere: an exterior ring must run
            # clockwise, or it is taken as "everything but this country". Set it by the planar signed
            # area (lon, lat), whatever order the source used; holes the other way round.
            pts = [[round(x, 2), round(y, 2)] for x, y in points]
            area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
            clockwise = area < 0
            return pts if clockwise == exterior else pts[::-1]

        polys = [geo["coordinates"]] if geo["type"] == "Polygon" else geo["coordinates"]
        polys = [[ring(r, k == 0) for k, r in enumerate(poly)] for poly in polys]
        coords = polys[0] if geo["type"] == "Polygon" else polys
        features.append({"type": "Feature", "properties": {"iso2": iso2, "name": name},
                         "geometry": {"type": geo["type"], "coordinates": coords}})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"type": "FeatureCollection",
                               "source": "Natural Earth 1:110m Admin 0 countries (public domain), via geopandas "
                                         "0.14.4 naturalearth_lowres; tools/make_world_geojson.py",
                               "features": features}, separators=(",", ":")))
    print(f"wrote {OUT}: {len(features)} countries, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
