"""The HTML report as a person sees it: opened in a real headless Chromium (Debian's `chromium`), with
every network request refused. No console error; the three charts rendered (the map's country
shapes, the Sankey's nodes, the violation bars); the tables are there and sortable; the screenshot
is not blank. Skipped where Chromium is not installed (.ci/run installs it)."""

import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from tests.helpers import write_pcap
from tests.names import build
from tests.names.build import CLIENT
from tests.register_fixtures import DOC_PUBLIC, T, payroll, write_setup

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: chromium)")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,2400",
                "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0",
                "--host-resolver-rules=MAP * ~NOTFOUND"]  # any request to the network fails, loudly


def chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def png_colours(path) -> int:
    """Distinct pixel values in an 8-bit RGB(A) PNG (filters undone), to tell a drawn page from a blank one."""
    data = open(path, "rb").read()
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, ctype = ihdr[:4]
    assert depth == 8 and ctype in (2, 6)
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, seen = bytearray(stride), set()
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 8 == 0:
            seen.update(bytes(line[k:k + bpp]) for k in range(0, stride, bpp * 4))
        prev = line
    return len(seen)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, city_db):
    import sys

    from tests.conftest import REPO

    tmp = tmp_path_factory.mktemp("html")
    write_setup(tmp, payroll(transfer_policy=None))
    hello = lambda n: build.records(build.client_hello(n))  # noqa: E731
    cap = write_pcap(tmp / "c.pcap", [
        (T, build.tcp(CLIENT, 50000, "203.0.113.9", 443, 1, hello("api.payroll.example"))),  # US, declared
        (T + 60, build.tcp(CLIENT, 50001, "203.0.113.140", 443, 1, hello("cn.tracker.example"))),  # CN
        (T + 3600, build.tcp(CLIENT, 50002, "198.51.100.7", 443, 1, hello("eu.tracker.example"))),  # DE
        (T + 7200, build.tcp(CLIENT, 50003, "203.0.113.10", 443, 1, hello("<script>alert(1)</script>.example"))),
    ])
    out = {}
    for cmd in ("audit", "inventory"):
        path = tmp / f"{cmd}.html"
        r = subprocess.run([sys.executable, "-m", "agent", cmd, *DOC_PUBLIC, "--geoip-db", city_db, "--policies",
                            str(tmp / "pol"), "--recipients", str(tmp / "reg.yaml"), "--html", str(path),
                            "--format", "json", str(cap)], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        out[cmd] = (path, json.loads(r.stdout))
    return out


@pytest.mark.parametrize("cmd", ["audit", "inventory"])
def test_report_renders_in_chromium_without_network_or_errors(reports, cmd, tmp_path):
    path, _rep = reports[cmd]
    text = path.read_text()
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(src|href)=["']https?://""", markup)  # nothing to load from elsewhere
    assert "<script>alert(1)" not in text  # a hostile host name is text, in the tables and in the chart data
    r = chromium("--dump-dom", path.as_uri())
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)
    dom = r.stdout
    assert len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == 3
    assert len(re.findall(r'class="choroplethlocation', dom)) > 177  # every country, then the ones with traffic
    assert len(re.findall(r'class="sankey-node', dom)) >= 6  # an exporter, recipients and countries
    assert re.search(r'class="point', dom)  # the violation bars
    assert dom.count('class="sortable"') == 6 and "data-dir" not in dom
    # the summary comes first, and says what was judged against what
    assert dom.index('id="summary"') < dom.index("ea-figure")
    summary = re.search(r'<table class="summary" id="summary">(.*?)</table>', dom, re.S).group(1)
    for want in ("Connections read", "Verdicts", "violation 3", "Time range", "Policies in force", "eu (",
                 "GeoIP data", "GeoIP2-City, built", "Generated", "egress-agent 0."):
        assert want in summary, (want, summary)
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ to ", summary)
    assert len(text) < 2_600_000, len(text)  # plotly.js compressed: was 5.2 MB inline
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", path.as_uri())
    assert png_colours(shot) > 40, "the screenshot is (nearly) blank"


def test_tables_sort_when_a_header_is_clicked(reports, tmp_path):
    """The report's own sort script, clicked from a page that loads it in a frame."""
    path, _rep = reports["audit"]
    probe = tmp_path / "probe.html"
    probe.write_text(f"""<!DOCTYPE html><html><body><iframe id="f" src="{path.as_uri()}" width="1200" height="900">
</iframe><script>
document.getElementById('f').onload = function () {{
  var d = this.contentDocument, t = d.querySelectorAll('table.sortable')[2];  // violations
  var before = Array.from(t.tBodies[0].rows).map(function (r) {{ return r.cells[3].textContent; }});
  t.tHead.rows[0].cells[3].click(); t.tHead.rows[0].cells[3].click();
  var after = Array.from(t.tBodies[0].rows).map(function (r) {{ return r.cells[3].textContent; }});
  var out = document.createElement('pre'); out.id = 'result';
  out.textContent = JSON.stringify({{before: before, after: after}}); document.body.appendChild(out);
}};
</script></body></html>""")
    r = chromium("--allow-file-access-from-files", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout)
    assert m, r.stdout[-500:]
    got = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(got["after"]) >= 2 and got["after"] == sorted(got["before"], reverse=True)


def test_violations_over_time_are_on_a_time_axis_and_the_map_says_what_it_shades(reports):
    path, _rep = reports["audit"]
    text = path.read_text()
    figs = [json.loads(m) for m in re.findall(r'<script type="application/json" id="fig-\d+">(.*?)</script>',
                                              text, re.S)]
    assert len(figs) == 3
    timeline = figs[2]
    assert timeline["layout"]["xaxis"]["type"] == "date"
    xs = [x for trace in timeline["data"] for x in trace["x"]]
    assert len(set(xs)) >= 2  # the violations fall in different hours: bars at their own times
    lo, hi = timeline["layout"]["xaxis"]["range"]
    assert lo < min(xs) and max(xs) < hi  # a bucket of margin: one busy hour is a bar, not the whole chart
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00", x) for x in xs), xs
    assert "Shaded by destination country" in text


def test_without_a_location_database_or_register_the_report_says_so(tmp_path):
    """The embedded default: the map is by country of registration and its caption says so; with no
    register loaded no recipient is listed as undeclared."""
    import sys

    from tests.conftest import REPO

    cap = write_pcap(tmp_path / "c.pcap", [
        (T, build.tcp(CLIENT, 50000, "8.8.8.8", 443, 1, flags="S")),
        (T + 0.1, build.tcp("8.8.8.8", 443, CLIENT, 50000, 1, flags="SA"))])
    path = tmp_path / "a.html"
    r = subprocess.run([sys.executable, "-m", "agent", "audit", "--html", str(path), "--format", "json", str(cap)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in r.stderr and r.returncode in (0, 1), r.stderr
    text = path.read_text()
    assert "by country of registration" in text and "not where the data went" in text
    assert "Seen but undeclared recipients" not in text and "No recipient register was loaded" in text
    assert "iptocc" in re.search(r'id="summary">(.*?)</table>', text, re.S).group(1)
    dom = chromium("--dump-dom", path.as_uri()).stdout
    assert len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == 3


def test_a_flow_log_at_the_edges_of_time_renders_and_the_page_counts_every_violation(tmp_path, monkeypatch):
    """Times of the epoch, whole and fractional seconds and the last second of 9999 (the latest a
    flow log may say): the timeline ends where time does (it overflowed: exit 70). The violations
    table shows the first MAX_ROWS and says how many more the JSON report has."""
    import sys

    from agent.sinks import html
    from tests.conftest import REPO

    monkeypatch.setattr(html, "MAX_ROWS", 2)  # the page is rendered in this process below
    times = [0.0, 1750000000.5, 1750000000, 253402300798.5, 253402300798.9999996]
    log = tmp_path / "edges.jsonl"
    log.write_text("".join(json.dumps({"proto": "tcp", "src": "10.0.0.5", "sport": 1000 + i, "dst": f"8.8.8.{i + 1}",
                                       "dport": 443, "packets": 1, "bytes": 10, "first_seen": t}) + "\n"
                           for i, t in enumerate(times)))
    path = tmp_path / "edges.html"
    r = subprocess.run([sys.executable, "-m", "agent", "audit", "--html", str(path), "--format", "json", str(log)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    assert "9999-12-31" in path.read_text()
    from agent.cli import build_parser
    from agent.commands.audit import run_audit

    small = tmp_path / "small.html"
    try:
        run_audit(build_parser().parse_args(["audit", "--html", str(small), "--format", "json", "--output",
                                             str(tmp_path / "r.json"), str(log)]))
    except SystemExit:
        pass
    text = small.read_text()
    assert "Violations (5)" in text and "3 more rows in the JSON report" in text
