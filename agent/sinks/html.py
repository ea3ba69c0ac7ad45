"""A self-contained HTML report for `audit --html` and `inventory --html`: opens with no network.

What it shows, from the same data as the JSON reports:
- a summary first: connections read (egress, inbound), packets and bytes, verdict counts, the time
  range, the policies in force (with their files' SHA-256), the GeoIP data and its version, the
  tool's version and the inputs, with any warnings;
- a world map of egress bytes by destination country, or by country of registration where no
  location database was given, said so on hover (plotly choropleth over Natural Earth 1:110m
  country shapes shipped in `assets/world.geojson`; plotly's own geo charts would fetch theirs
  from a CDN when opened);
- exporter -> recipient -> country as a Sankey diagram, by bytes;
- violations over time, per policy, on a time axis (bars per hour, or per day when the inputs span
  more than three days; gaps in time are gaps on the axis);
- the undeclared recipients (only when a register was loaded: without one every recipient is
  undeclared and the list says nothing), violations (with direction and how the opener is known),
  observed transfers, destinations and inbound peers by country as tables, each sortable by
  clicking a column header (a few lines of inline script; no external code).

plotly.js is inlined once, gzip-compressed (base64, ~2 MB instead of 4.8 MB; unpacked in the page
by the browser's DecompressionStream: Chromium 80+, Firefox 113+, Safari 16.4+), and each chart's
figure is JSON beside it, drawn once plotly is loaded. PyPI's plotly ships no partial bundle (those
are npm packages), so compression is what shrinks the page here. The file needs nothing else.
Contract: `write_html(path, title, data)`; `data` keys: `by_country` (rows as in
`destinations_by_country`), `inbound_by_country`, `inventory` (Inventory.to_json()), `violations`
(report records: all, or the first MAX_ROWS with `violations_total` the count and `violation_times`
every violation's (policy, first_seen)), `inputs` (input stats), and for the summary `totals`, `verdicts`, `policies`,
`geoip`, `tool`, `time_range`, `warnings` (as in the JSON report; each optional). Text is escaped;
nothing from a flow becomes markup (figure JSON escapes <, > and &).
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
document.querySelectorAll('table.sortable th').forEach(function (th) {
  var col = th.cellIndex;
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
.caption { color: #444; font-size: 0.9em; max-width: 60em; }
table.summary th { background: #f7f7f7; cursor: default; width: 11em; }
table.summary { font-size: 0.9em; max-width: 80em; }
"""


@lru_cache(maxsize=1)
def world() -> dict:
    return json.loads(WORLD.read_text())


def _figures(data: dict) -> list[tuple[str, object, str]]:
    """(heading, figure, caption) of each chart."""
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
    if registered and not located:
        caption = ("No location database was given: countries are shaded by where each address is "
                   "registered (regional internet registries), which is not where the data went. The tables "
                   "below say \"location unknown\" for the same reason. Pass --geoip-db for locations.")
    elif registered:
        caption = ("Shaded by destination country (GeoIP); countries marked \"country of registration\" on "
                   "hover had addresses the database could not locate, shown by where they are registered.")
    else:
        caption = "Shaded by destination country (GeoIP database), bytes the local side sent."
    figs.append(("Where data went: egress bytes by destination country" if located or not registered
                 else "Where data went: egress bytes by country of registration", fig, caption))

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
    figs.append(("Who sent data to whom, and where: exporter → recipient → country (bytes)", fig, ""))

    times = data.get("violation_times")
    if times is None:
        times = [(v["policy"], v.get("first_seen")) for v in data.get("violations", [])]
    times = [(p, t) for p, t in times if t]
    parsed = [(p, datetime.fromisoformat(t.replace("Z", "+00:00"))) for p, t in times]
    span = (max(t for _p, t in parsed) - min(t for _p, t in parsed)).days if parsed else 0
    daily = span > 3
    fmt, width = ("%Y-%m-%d", 86400000) if daily else ("%Y-%m-%d %H:00", 3600000)
    per = defaultdict(Counter)
    for p, t in parsed:
        per[p][t.strftime(fmt)] += 1
    # a time axis: buckets sit at their own time (an idle week is a gap), each bar one bucket wide
    fig = go.Figure([go.Bar(name=p, x=[k if daily else k.replace(" ", "T") + ":00" for k in sorted(c)],
                            y=[c[k] for k in sorted(c)], width=[width * 0.8] * len(c), offset=0)
                     for p, c in sorted(per.items())])
    fig.update_layout(barmode="stack", margin=dict(l=40, r=10, t=10, b=40), height=320,
                      yaxis_title="violations", xaxis_title="day (UTC)" if daily else "hour (UTC)")
    fig.update_xaxes(type="date")
    if parsed:  # a bucket of margin each side, so one busy hour is a bar, not the whole chart
        from datetime import timedelta

        step = timedelta(milliseconds=width)
        lo = datetime.strptime(min(t for _p, t in parsed).strftime(fmt), fmt) - step
        last = datetime.strptime(max(t for _p, t in parsed).strftime(fmt), fmt)
        # a time in the year 9999 (the latest a flow log may say) has no room after it: the axis ends there
        hi = last + 2 * step if last < datetime.max - 2 * step else datetime.max.replace(microsecond=0)
        fig.update_xaxes(range=[lo.isoformat(), hi.isoformat()])
    figs.append(("Violations over time, by policy", fig,
                 f"Violations by the {'day' if daily else 'hour'} their connection was first seen (UTC)."))
    return figs


def _table(title: str, columns: list[str], rows: list[list], note: str = "", total: int | None = None) -> str:
    """A sortable table of the first MAX_ROWS rows; `total`: how many there are, when `rows` holds
    only the first ones."""
    total = len(rows) if total is None else total
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
    more = f'<p class="muted">{total - MAX_ROWS:,} more rows in the JSON report.</p>' \
        if total > MAX_ROWS else ""
    note = f'<p class="muted">{html.escape(note)}</p>' if note else ""
    return (f"<h2>{html.escape(title)} ({total:,})</h2>{note}<table class=\"sortable\"><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table>{more}")


def _figure_json(fig) -> str:
    """A figure as JSON that is safe inside <script>: no <, > or & survives as itself."""
    return fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def _plotly_gz() -> str:
    import base64
    import gzip

    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), 9, mtime=0)).decode()


# Unpacks plotly.js (gzip, base64) and draws every figure. Without DecompressionStream the charts
# say so; the tables work either way.
LOADER_JS = """
(function () {
  var figs = document.querySelectorAll('div.ea-figure');
  function say(text) { figs.forEach(function (d) { d.textContent = text; }); }
  if (typeof DecompressionStream === 'undefined') {
    say('The charts need a browser with DecompressionStream (Chromium 80+, Firefox 113+, Safari 16.4+).');
    return;
  }
  var b64 = document.getElementById('plotly-gz').textContent, raw = atob(b64);
  var bytes = new Uint8Array(raw.length);
  for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'))).text().then(function (js) {
    var s = document.createElement('script'); s.textContent = js; document.head.appendChild(s);
    figs.forEach(function (d) {
      var f = JSON.parse(document.getElementById(d.dataset.fig).textContent);
      Plotly.newPlot(d, f.data, f.layout, {displaylogo: false, responsive: true});
    });
  }, function (e) { say('The charts could not be unpacked: ' + e); });
})();
"""


def _summary(data: dict) -> str:
    """The block a reader sees first: what was read, what was judged, against what, with what data."""
    e = html.escape
    tot = data.get("totals") or {}
    rows = []
    if tot:
        rows.append(("Connections read", f"{tot.get('flows', 0):,} (egress {tot.get('egress_flows', 0):,}, "
                     f"inbound {tot.get('inbound_flows', 0):,}); {tot.get('packets', 0):,} packets, "
                     f"{tot.get('bytes', 0):,} bytes"))
    verdicts = data.get("verdicts") or {}
    if verdicts:
        rows.append(("Verdicts", ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in verdicts.items())))
    tr = data.get("time_range") or {}
    rows.append(("Time range", f"{tr['first_seen']} to {tr['last_seen']} (UTC)" if tr.get("first_seen")
                 else "no timestamps in the inputs"))
    pols = data.get("policies") or []
    if pols:
        rows.append(("Policies in force", "; ".join(f"{p['name']} ({p.get('file') or '?'}, sha256 "
                                                    f"{(p.get('sha256') or '?')[:12]}…)" for p in pols)))
    geo = data.get("geoip") or []
    if geo:
        rows.append(("GeoIP data", "; ".join(
            f"{g.get('database_type') or '?'}" + (f" {g['version']}" if g.get("version") else "")
            + (f", built {g['build_date']}" if g.get("build_date") else "") + (f" ({g['path']})" if g.get("path")
                                                                               else "") for g in geo)))
    rows.append(("Inputs", ", ".join(i.get("path") or "?" for i in data.get("inputs", [])) or "none"))
    tool = data.get("tool") or {}
    rows.append(("Generated", f"{data.get('generated_at', '')} by {tool.get('name', 'egress-agent')} "
                 f"{tool.get('version', '')}".strip()))
    warns = data.get("warnings") or []
    if warns:
        rows.append(("Warnings", f"{len(warns):,}: " + " | ".join(warns[:5]) + (" …" if len(warns) > 5 else "")))
    body = "".join(f"<tr><th scope=\"row\">{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return f'<h2>Summary</h2><table class="summary" id="summary"><tbody>{body}</tbody></table>'


def render(title: str, data: dict) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", _summary(data)]
    for n, (heading, fig, caption) in enumerate(_figures(data)):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if caption:
            parts.append(f'<p class="caption">{html.escape(caption)}</p>')
        parts.append(f'<div class="ea-figure" data-fig="fig-{n}"></div>'
                     f'<script type="application/json" id="fig-{n}">{_figure_json(fig)}</script>')
    inv = data.get("inventory", {})
    if inv.get("register") is not None:
        parts.append(_table("Seen but undeclared recipients", ["recipient", "flows", "bytes", "countries",
                                                               "exporters", "host names"],
                            [[u["recipient"], u["flows"], u["bytes"], ", ".join(u["countries"]),
                              ", ".join(u["exporters"]), ", ".join(u["hostnames"][:5])]
                             for u in inv.get("undeclared", [])]))
        parts.append(_table("Declared recipients seen outside their declared locations",
                            ["recipient", "name", "declared", "seen outside", "flows", "bytes"],
                            [[o["recipient"], o["name"], ", ".join(o["declared"]), ", ".join(o["observed_outside"]),
                              o["flows"], o["bytes"]] for o in inv.get("outside_declared_locations", [])]))
    else:
        parts.append('<p class="muted">No recipient register was loaded (--recipients): recipients are '
                     'named from host names and network operators below, and none is called undeclared.</p>')
    parts.append(_table("Violations", ["first seen", "policy", "severity", "peer", "host name", "country",
                                       "recipient", "direction", "opened by", "message"],
                        [[v.get("first_seen"), v["policy"], v["severity"],
                          f"{v['src'] if v.get('direction') == 'inbound' else v['dst']}:"
                          f"{v['sport'] if v.get('direction') == 'inbound' else v['dst_port']}",
                          v.get("hostname"), v.get("country"), v.get("recipient"), v.get("direction"),
                          v.get("opened_by"), v["message"]]
                         for v in data.get("violations", [])[:MAX_ROWS]], total=data.get("violations_total")))
    parts.append(_table("Observed transfers", ["exporter", "recipient", "declared", "countries", "flows",
                                               "bytes sent", "bytes received", "basis"],
                        [[r["exporter"], r["recipient"], "yes" if r["declared"] else "no",
                          ", ".join(f"{c} {b:,}" for c, b in r["countries"].items()), r["flows"], r["bytes"],
                          r.get("bytes_received", 0), ", ".join(r["bases"])] for r in inv.get("inventory", [])]))
    parts.append(_table("Destinations by country (egress connections)",
                        ["country", "destinations", "connections", "packets sent", "bytes sent",
                         "packets received", "bytes received"],
                        [[r["country"] or "unknown", r["distinct_dst"], r["flows"], r["packets"], r["bytes"],
                          r.get("packets_received", 0), r.get("bytes_received", 0)]
                         for r in data.get("by_country", [])]))
    parts.append(_table("Inbound peers by country (connections public peers opened)",
                        ["country", "peers", "connections", "packets sent", "bytes sent", "packets received",
                         "bytes received"],
                        [[r["country"] or "unknown", r["distinct_src"], r["flows"], r["packets"], r["bytes"],
                          r.get("packets_received", 0), r.get("bytes_received", 0)]
                         for r in data.get("inbound_by_country", [])],
                        "Judged only by policies whose directions include inbound; sent and received are the "
                        "local host's."))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{GEO_ASSETS_JS}</script></head><body>{''.join(parts)}"
            f'<script type="application/octet-stream" id="plotly-gz">{_plotly_gz()}</script>'
            f"<script>{LOADER_JS}</script><script>{SORT_JS}</script></body></html>")


def write_html(path: str, title: str, data: dict):
    from agent.output import write_output

    write_output(render(title, data), path)
