"""The operations kit against the real tools: systemd-analyze, promtool, prometheus, Kubernetes schemas.

The end-to-end test starts Debian's `prometheus` on loopback with the shipped scrape config and
rules, pointed at a real agent that sees real traffic from a namespace (documentation addresses),
waits for the violation alert to fire through the HTTP API, and evaluates every PromQL expression
of the Grafana dashboard and of the Grafana-managed alert rules, each of which must return data.
"""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.agent_process import REPO, Agent, free_port, wait_for
from tests.netns import Topology

DEPLOY = REPO / "deploy"
SYSTEMD = REPO / "systemd"
needs = lambda tool: pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed")  # noqa: E731


def unit_copy(tmp_path, name):
    """The shipped unit with ExecStart pointing at this checkout's command (verify checks it exists)."""
    exe = shutil.which("egress-agent") or str(Path(sys.executable).with_name("egress-agent"))
    text = (SYSTEMD / name).read_text().replace("/usr/local/bin/egress-agent", exe)
    (tmp_path / name).write_text(text)
    return tmp_path / name


@needs("systemd-analyze")
def test_units_verify_and_service_exposure_is_at_most_2(tmp_path):
    units = [unit_copy(tmp_path, n) for n in ("egress-agent.service", "egress-agent-audit.service",
                                               "egress-agent-audit.timer")]
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    for unit in units[:2]:
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        assert m, r.stdout[-500:] + r.stderr
        print(f"systemd-analyze security {unit.name}: exposure {m.group(1)}")
        assert float(m.group(1)) <= 2.0


def test_every_hardening_line_says_why():
    lines = (SYSTEMD / "egress-agent.service").read_text().splitlines()
    section = lines[lines.index("[Service]"):lines.index("[Install]")]
    hardening = ("Protect", "Private", "Restrict", "Capability", "Ambient", "SystemCall", "NoNew", "Memory",
                 "Lock", "IPAddress", "DynamicUser", "Secure", "Device", "Proc", "UMask", "RemoveIPC", "Keyring")
    for i, line in enumerate(section):
        if line.startswith(hardening):
            # a comment within the run of settings directly above it
            j = i - 1
            while j >= 0 and section[j] and not section[j].startswith("#"):
                j -= 1
            assert j >= 0 and section[j].startswith("#"), f"no comment says why: {line}"


@needs("promtool")
def test_prometheus_rules_check_and_unit_tests():
    r = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus/rules/egress-agent.rules.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", "egress-agent.test.yml", "egress-agent-daily.test.yml"],
                       capture_output=True, text=True, cwd=DEPLOY / "prometheus/tests")
    assert r.returncode == 0, r.stdout + r.stderr
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/egress-agent.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus/tests/egress-agent.test.yml").read_text() +
                            (DEPLOY / "prometheus/tests/egress-agent-daily.test.yml").read_text()))
    assert alerts == tested
    for g in rules["groups"]:
        for rule in g["rules"]:
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_generated_files_are_in_sync():
    r = subprocess.run([sys.executable, str(DEPLOY / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    k8s = yaml.safe_load((DEPLOY / "kubernetes/prometheusrule.yaml").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/egress-agent.rules.yml").read_text())
    assert k8s["spec"]["groups"] == rules["groups"]


@needs("promtool")
def test_prometheusrule_groups_pass_promtool(tmp_path):
    k8s = yaml.safe_load((DEPLOY / "kubernetes/prometheusrule.yaml").read_text())
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": k8s["spec"]["groups"]}))
    r = subprocess.run(["promtool", "check", "rules", str(tmp_path / "r.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_manifests_validate_against_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    docs = [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"DaemonSet", "ConfigMap", "Service", "PodMonitor", "PrometheusRule", "Namespace", "ServiceAccount"} <= kinds
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # CRDs: not in the core schemas; the rules inside are checked by promtool above
        kv.validate(d, "1.30.0", strict=True)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["hostNetwork"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    # NET_ADMIN for conntrack; SYS_PTRACE + DAC_READ_SEARCH make hostPID useful for attribution (docs/ATTRIBUTION.md)
    caps = c["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"]}


def test_dashboard_has_datasource_and_instance_variables():
    d = json.loads((DEPLOY / "grafana/dashboards/egress-agent.json").read_text())
    names = {v["name"]: v["type"] for v in d["templating"]["list"]}
    assert names == {"datasource": "datasource", "instance": "query"}
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], t["expr"]


# ---- end to end with a real Prometheus -------------------------------------------------------

WHY = Topology.available()


def dashboard_queries():
    d = json.loads((DEPLOY / "grafana/dashboards/egress-agent.json").read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p["targets"]]


def grafana_alert_queries():
    doc = yaml.safe_load((DEPLOY / "grafana/provisioning/alerting/egress-agent.yaml").read_text())
    return [(r["title"], q["model"]["expr"]) for g in doc["groups"] for r in g["rules"] for q in r["data"]
            if q["datasourceUid"] != "__expr__"]


def grafana_vars(expr: str) -> str:
    """What Grafana substitutes before the query reaches Prometheus."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "10m").replace("$__interval", "15s")
            .replace('"$instance"', '".*"'))


class Prom:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path, **params):
        url = f"{self.base}/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def query(self, expr):
        return self.get("query", query=expr)


@pytest.mark.root
@pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")
@needs("prometheus")
def test_end_to_end_alert_fires_and_every_query_returns_data(tmp_path):
    with Topology("eamon") as topo:
        server = topo.serve()
        (tmp_path / "agent").mkdir()
        agent = Agent(tmp_path / "agent", topo).start()
        # a collector beside it (the dashboard's per-exporter row, the export-loss alerts): one exporter
        # on loopback sends two NetFlow v5 datagrams, two records apart (two lost)
        (tmp_path / "collector").mkdir()
        nf_port = free_port()
        collector = Agent(tmp_path / "collector", SimpleNamespace(client=None), config={
            "sources": ["netflow"], "netflow": {"listen": [f"127.0.0.1:{nf_port}"]}, "attribution": False,
            "host_addresses": False, "exporters": [{"address": "127.0.0.1", "site": "lab"}]}).start()
        prom_port = free_port()
        cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        cfg["rule_files"] = [str(DEPLOY / "prometheus/rules/egress-agent.rules.yml")]
        cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{agent.port}",
                                                                    f"127.0.0.1:{collector.port}"]
        # the nightly audit's result, served as node_exporter's textfile collector would (its file as is)
        node = tmp_path / "node"
        node.mkdir()
        run = subprocess.run([sys.executable, "-m", "agent", "audit", "--textfile", str(node / "metrics"),
                              str(REPO / "examples/demo.pcap")], capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 1, run.stderr
        node_port = free_port()
        textfile = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(node_port)],
                                    cwd=node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg["scrape_configs"].append({"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{node_port}"]}]})
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
        api = Prom(prom_port)
        clients = []
        try:
            wait_for(lambda: _up(api), timeout=30, what="prometheus scraping the agent")
            time.sleep(2)  # a few samples before traffic, so increase() sees the counters move
            from tests.sources.test_collector import BACK, OUT, _send, _v5

            _send(nf_port, [_v5(0, [OUT]), _v5(3, [BACK])])
            for dst in ("203.0.113.9", "203.0.113.250", "203.0.113.10", "198.51.100.7"):
                clients.append(topo.connect("tcp", dst, hold=60)[0])
            # One flow ends, so byte counters (counted at DESTROY) have data too.
            c, _ = topo.connect("tcp", "198.51.100.130", hold=0.3)
            c.wait(timeout=10)
            topo.run("conntrack", "-D", "-p", "tcp", "-d", "198.51.100.130", check=False)
            firing = wait_for(lambda: _alert(api, "EgressResidencyViolation"), timeout=60,
                              what="EgressResidencyViolation firing")
            assert firing["labels"]["policy"] == "eu-data" and firing["labels"]["severity"] == "high"
            print(f"end to end: EgressResidencyViolation {firing['state']} for policy {firing['labels']['policy']}")
            time.sleep(3)
            problems = []
            queries = dashboard_queries() + grafana_alert_queries()
            for title, expr in queries:
                r = api.query(grafana_vars(expr))
                if r["status"] != "success":
                    problems.append(f"{title}: {expr}: {r}")
                elif not r["data"]["result"]:
                    problems.append(f"{title}: {expr}: no data")
            values = api.get("label/instance/values", **{"match[]": "egress_agent_build_info"})["data"]
            assert sorted(values) == sorted([f"127.0.0.1:{agent.port}", f"127.0.0.1:{collector.port}"])
            assert not problems, "\n".join(problems)
            print(f"end to end: {len(queries)} dashboard and Grafana alert queries evaluated, all returned data")
            audit = wait_for(lambda: _alert(api, "EgressAuditViolations"), timeout=30,
                             what="EgressAuditViolations firing from the audit's textfile")
            assert audit["labels"]["policy"] == "gdpr-personal-data" and audit["labels"]["severity"] == "high"
            loss = wait_for(lambda: _alert(api, "EgressExportLoss"), timeout=30, what="EgressExportLoss firing")
            assert loss["labels"]["exporter"] == "lab" and loss["labels"]["source"] == "netflow"
        finally:
            textfile.kill()
            for c in clients:
                c.kill()
            prom.terminate()
            prom.wait(timeout=20)
            agent.stop()
            collector.stop()
            server.kill()


def _up(api):
    try:
        r = api.query('up{job="egress-agent"}')
    except OSError:
        return False
    return any(x["value"][1] == "1" for x in r["data"]["result"])


def _alert(api, name):
    for a in api.get("alerts")["data"]["alerts"]:
        if a["labels"]["alertname"] == name and a["state"] == "firing":
            return a
    return None
