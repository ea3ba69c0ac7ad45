"""A real `egress-agent run` process for tests: config, metrics scraping, evidence reading.

Used by the daemon and monitoring end-to-end tests (root, namespaces from tests/netns.py).
"""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import build_asn_mmdb, build_city_mmdb
from tests.netns import Topology

REPO = Path(__file__).resolve().parent.parent


POLICY = """\
version: 1
name: eu-data
home: [EU]
severity: high
allow: {jurisdictions: [EEA, EU-ADEQUATE]}
exceptions:
  - {id: vendor-scc, basis: scc, reference: "SCC with Example Vendor", owner: dpo@example.com,
     destinations: {networks: [203.0.113.10/32]}, expires: 2099-01-01}
"""


def free_port():
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Agent:
    """One daemon process with its config, metrics endpoint and evidence file."""

    def __init__(self, tmp: Path, topo: Topology, config: dict | None = None, **source):
        self.tmp, self.topo = tmp, topo
        self.port = free_port()
        self.policies = tmp / "policies"
        self.policies.mkdir(exist_ok=True)
        (self.policies / "eu-data.yaml").write_text(POLICY)
        self.db = tmp / "city.mmdb"
        if not self.db.exists():
            build_city_mmdb(self.db)
        self.asn = tmp / "asn.mmdb"
        if not self.asn.exists():
            build_asn_mmdb(self.asn)
        self.evidence = tmp / "evidence.jsonl"
        self.config = tmp / "agent.yaml"
        src = {"type": "conntrack", "netns": topo.client, "enable": True, **source}
        self.config.write_text(json.dumps({
            "policies": str(self.policies), "geoip_databases": [str(self.db), str(self.asn)],
            "geoip_check_interval": 0.5, "listen": f"127.0.0.1:{self.port}",
            "local_nets": ["192.0.2.0/24", "2001:db8:1::/64"],
            "public_nets": ["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"],
            "evidence": {"path": str(self.evidence), "max_bytes": 64 << 20}, "source": src, **(config or {})}))
        self.proc = None
        self.sources = (config or {}).get("sources", ["conntrack"])

    def start(self):
        self.log = open(self.tmp / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                     cwd=REPO, stdout=self.log, stderr=self.log)
        wait_for(lambda: self.scrape(quiet=True) is not None, what="metrics endpoint")
        for name in self.sources:
            wait_for(lambda n=name: self.value("egress_agent_source_up", source=n) == 1, what=f"source {name} up")
        return self

    def scrape(self, quiet=False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            if quiet:
                return None
            raise

    def value(self, name, **labels):
        text = self.scrape(quiet=True)
        if text is None:
            return None
        total = None
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total = (total or 0) + s.value
        return total

    def lines(self):
        """Every evidence record, oldest first, across rotated files (evidence.jsonl.N ... .1, current)."""
        files = sorted(self.tmp.glob("evidence.jsonl.*"), key=lambda p: -int(p.suffix[1:])) + [self.evidence]
        return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]

    def evidence_for(self, dst, **match):
        return [r for r in self.lines() if "flow" in r and r["flow"]["dst"] == dst
                and all(r.get(k) == v for k, v in match.items())]

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            rc = self.proc.wait(timeout=20)
            self.log.close()
            return rc
        return self.proc.returncode if self.proc else None

    def logtext(self):
        return (self.tmp / "agent.log").read_text(errors="replace")


