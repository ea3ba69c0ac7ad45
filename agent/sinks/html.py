"""A self-contained HTML report for `audit --html` and `inventory --html`: opens with no network.

What it shows, from the same data as the JSON reports:
- a world map of egress bytes by destination country, or by country of registration where no
  location database was given, said so on hover (plotly choropleth over Natural Earth 1:110m
  country shapes shipped in `assets/world.geojson`; plotly's own geo charts would fetch theirs
  from a CDN when opened);
- exporter -> recipient -> country as a Sankey diagram, by bytes;
- violations over time, per policy (by hour, or by day when the inputs span more than three days);
- the undeclared recipients, violations, observed transfers and destinations as tables, each
  sortable by clicking a column header (a few lines of inline script; no external code).

plotly.js is inlined once (`include_plotlyjs=True`), so the file is ~5 MB and needs nothing else.
Contract: `write_html(path, title, data)`; `data` keys: `by_country` (rows as in
`destinations_by_country`), `inventory` (Inventory.to_json()), `violations` (report records),
`inputs` (input stats). Text is escaped; nothing from a flow becomes markup.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from datetime import datetime
from functools import lru_cache
from pathlib import Path

WORLD = Path(__file__).with_name("assets") / "world.geojson"
MAX_ROWS = 2000  # per table; the JSON report has all
MAX_SANKEY_LINKS = 150

# plotly.js fetches its own base-map TopoJSON from a CDN before drawing any geo chart, unless
# window.PlotlyGeoAssets already holds one. The map draws country shapes from world.geojson and
# hides every base layer, so an empty topology under any name is all it needs: no request is made.
GEO_ASSETS_JS = """
(function () {
  var empty = {type: 'GeometryCollection', geometries: []};
  var topo = {type: 'Topology', arcs: [], objects: {land: empty, ocean: empty, lakes: empty, rivers: empty,
              coastlines: empty, countries: empty, subunits: empty}};
  window.PlotlyGeoAssets = {topojson: new Proxy({}, {get: function (t, k) { return k in t ? t[k] : topo; }})};
})();
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #666; font-size: 0.85em; }
"""


@lru_cache(maxsize=1)
def world() -> dict:
    return json.loads(WORLD.read_text())


def _figures(data: dict) -> list[tuple[str, object]]:
    import plotly.graph_objects as go

    figs = []
    feats = world()["features"]
    names = {f["properties"]["iso2"]: f["properties"]["name"] for f in feats}
    # bytes per country from the inventory: located where GeoIP says, else (no location data) the
    # country of registration, which the hover text says is not a location
    located, registered = Counter(), Counter()
    for row in data.get("inventory", {}).get("inventory", []):
        for country, by in row["countries"].items():
            if country.startswith("registered:"):
                registered[country.split(":", 1)[1]] += by
            elif len(country) == 2:
                located[country] += by
    shown = sorted(set(located) | set(registered))
    text = [f"{names.get(c, c)}: {located[c] + registered[c]:,} bytes"
            + (" (country of registration; location unknown)" if registered[c] and not located[c] else "")
            for c in shown]
    fig = go.Figure([
        go.Choropleth(geojson=world(), featureidkey="properties.iso2", locations=list(names),
                      z=[0] * len(names), colorscale=[[0, "#eeeeee"], [1, "#eeeeee"]], showscale=False,
                      hoverinfo="location", marker_line_color="#999", marker_line_width=0.3),
        go.Choropleth(geojson=world(), featureidkey="properties.iso2", locations=shown,
                      z=[located[c] + registered[c] for c in shown], text=text, hoverinfo="text",
                      colorscale="Blues", marker_line_color="#555", marker_line_width=0.4,
                      colorbar_title="bytes")])
    fig.update_geos(fitbounds=False, visible=False, showcountries=False, projection_type="natural earth")
    fig.update_layout(margin=dict(l=0, r=0, t=10, b=0), height=480)
    figs.append(("Where data went: egress bytes by destination country", fig))

    links = Counter()
    for row in data.get("inventory", {}).get("inventory", []):
        links[(f"exporter {row['exporter']}", f"recipient {row['recipient']}")] += row["bytes"]
        for country, by in row["countries"].items():
            links[(f"recipient {row['recipient']}", f"country {country}")] += by
    top = links.most_common(MAX_SANKEY_LINKS)
    nodes = sorted({n for (a, b), _v in top for n in (a, b)})
    index = {n: i for i, n in enumerate(nodes)}
    fig = go.Figure(go.Sankey(node=dict(label=nodes, pad=12, thickness=14),
                              link=dict(source=[index[a] for (a, _b), _v in top],
                                        target=[index[b] for (_a, b), _v in top],
                                        value=[max(v, 1) for _k, v in top])))
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10), height=max(360, 22 * len(nodes)))
    figs.append(("Who sent data to whom, and where: exporter → recipient → country (bytes)", fig))

    times = [(v["policy"], v["first_seen"]) for v in data.get("violations", []) if v.get("first_seen")]
    parsed = [(p, datetime.fromisoformat(t.replace("Z", "+00:00"))) for p, t in times]
    span = (max(t for _p, t in parsed) - min(t for _p, t in parsed)).days if parsed else 0
    fmt = "%Y-%m-%d" if span > 3 else "%Y-%m-%d %H:00"
    per = defaultdict(Counter)
    for p, t in parsed:
        per[p][t.strftime(fmt)] += 1
    fig = go.Figure([go.Bar(name=p, x=sorted(c), y=[c[k] for k in sorted(c)]) for p, c in sorted(per.items())])
    fig.update_layout(barmode="stack", bargap=0.5, margin=dict(l=40, r=10, t=10, b=40), height=320,
                      yaxis_title="violations", xaxis_title="day" if span > 3 else "hour (UTC)")
    fig.update_xaxes(type="category")  # one bar per bucket, not a time axis stretched over seconds
    figs.append(("Violations over time, by policy", fig))
    return figs


def _table(title: str, columns: list[str], rows: list[list], note: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows[:MAX_ROWS]:
        cells = []
        for v in r:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="n" data-v="{v}">{v:,}</td>')
            else:
                cells.append(f"<td>{html.escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="muted">{len(rows) - MAX_ROWS:,} more rows in the JSON report.</p>' \
        if len(rows) > MAX_ROWS else ""
    note = f'<p class="muted">{html.escape(note)}</p>' if note else ""
    return (f"<h2>{html.escape(title)} ({len(rows):,})</h2>{note}<table class=\"sortable\"><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table>{more}")


def render(title: str, data: dict) -> str:
    from plotly.io import to_html

    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="muted">Generated {html.escape(data.get("generated_at", ""))} from '
             f'{html.escape(", ".join(i.get("path", "?") for i in data.get("inputs", [])))}</p>']
    first = True
    for heading, fig in _figures(data):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(to_html(fig, full_html=False, include_plotlyjs=first, config={"displaylogo": False}))
        first = False
    inv = data.get("inventory", {})
    parts.append(_table("Seen but undeclared recipients", ["recipient", "flows", "bytes", "countries", "exporters",
                                                           "host names"],
                        [[u["recipient"], u["flows"], u["bytes"], ", ".join(u["countries"]),
                          ", ".join(u["exporters"]), ", ".join(u["hostnames"][:5])] for u in inv.get("undeclared", [])],
                        "" if inv.get("register") is not None else "No recipient register was loaded (--recipients)."))
    parts.append(_table("Declared recipients seen outside their declared locations",
                        ["recipient", "name", "declared", "seen outside", "flows", "bytes"],
                        [[o["recipient"], o["name"], ", ".join(o["declared"]), ", ".join(o["observed_outside"]),
                          o["flows"], o["bytes"]] for o in inv.get("outside_declared_locations", [])]))
    parts.append(_table("Violations", ["first seen", "policy", "severity", "destination", "host name", "country",
                                       "recipient", "message"],
                        [[v.get("first_seen"), v["policy"], v["severity"], f"{v['dst']}:{v['dst_port']}",
                          v.get("hostname"), v.get("country"), v.get("recipient"), v["message"]]
                         for v in data.get("violations", [])]))
    parts.append(_table("Observed transfers", ["exporter", "recipient", "declared", "countries", "flows", "bytes",
                                               "basis"],
                        [[r["exporter"], r["recipient"], "yes" if r["declared"] else "no",
                          ", ".join(f"{c} {b:,}" for c, b in r["countries"].items()), r["flows"], r["bytes"],
                          ", ".join(r["bases"])] for r in inv.get("inventory", [])]))
    parts.append(_table("Destinations by country", ["country", "destinations", "flows", "packets", "bytes"],
                        [[r["country"] or "unknown", r["distinct_dst"], r["flows"], r["packets"], r["bytes"]]
                         for r in data.get("by_country", [])]))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{GEO_ASSETS_JS}</script></head><body>{''.join(parts)}<script>{SORT_JS}</script></body></html>")


def write_html(path: str, title: str, data: dict):
    from agent.output import write_output

    write_output(render(title, data), path)
