"""The shipped units under a real systemd: a Debian container booted with `systemd-nspawn -b`.

The root file system is built once per machine with debootstrap (from the Debian mirror apt uses
here) and cached in $EGRESS_AGENT_TEST_CACHE (default /var/cache/egress-agent-tests), keyed on the
suite, mirror and package list. Each run copies it, installs the project by running the README's
"Run as a service" commands word for word inside the booted container (pip reads a wheelhouse of
the dependencies built on the host, as the container has no route to a package index), and checks
from the outside: READY, metrics, a connection judged into evidence and metrics, `systemctl reload`
with a good and a broken policy, the audit timer's service, the watchdog restarting a frozen agent,
and the exposure scores with and without the attribution drop-in.

The container's network namespace is a test topology (tests/netns.py): a veth to a peer namespace
that owns documentation addresses. Nothing leaves this machine. Skips, with the reason, where the
kernel, debootstrap or nspawn refuse. A transcript (journal lines, scores) is written to
$EGRESS_AGENT_TEST_CACHE/nspawn-report.txt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import build_city_mmdb
from tests.netns import Topology

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EGRESS_AGENT_TEST_CACHE", "/var/cache/egress-agent-tests"))
# tcpdump brings libpcap, which scapy compiles the capture source's kernel filter with
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,iproute2,conntrack,nftables,curl,procps,tcpdump"
REPORT: list[str] = []


def _mirror_and_suite() -> tuple[str, str]:
    suite = "bookworm"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME=") and line.split("=", 1)[1]:
            suite = line.split("=", 1)[1].strip('"')
    mirror = "http://deb.debian.org/debian"
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = f.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s",
                                                                          text, re.M)
        if m:
            mirror = m.group(1)
            break
    return mirror, suite


def _rootfs() -> Path:
    mirror, suite = _mirror_and_suite()
    key = hashlib.sha256(f"{mirror} {suite} {PACKAGES}".encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{key}"
    if (root / "usr/bin/python3").exists():
        return root
    tmp = CACHE / f"rootfs-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, str(tmp), mirror],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap {suite} from {mirror} failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    tmp.rename(root)
    return root


def _wheelhouse() -> Path:
    """Wheels of the dependencies (and the build backend) for an offline `pip install .` inside."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "setup.py").read_bytes()).hexdigest()[:12]
    w = CACHE / f"wheels-{key}"
    if (w / ".complete").exists():
        return w
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(w), str(REPO), "setuptools", "wheel"],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"cannot build the wheelhouse for the container: {r.stderr[-800:]}")
    for own in w.glob("egress_agent-*.whl"):
        own.unlink()  # the README builds the project itself from the source tree
    (w / ".complete").write_text("ok")
    return w


def _source_copy(dest: Path):
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    ".pytest_cache", ".hypothesis", "bench")
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


def readme_service_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run as a service"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Box:
    def __init__(self, nspawn: subprocess.Popen, leader: int, root: Path):
        self.nspawn, self.leader, self.root = nspawn, leader, root

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
                            "/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"`{script}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def journal(self, unit: str, since: str = "") -> str:
        return self.sh(f"journalctl -u {unit} -o short-monotonic --no-pager {since}", check=False).stdout

    def metrics(self) -> str:
        return self.sh("curl -sf 127.0.0.1:9807/metrics", check=False).stdout

    def wait(self, what, timeout: float = 30.0, every: float = 0.5):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = what()
            if got:
                return got
            time.sleep(every)
        return what()


def _metric(text: str, name: str, **labels) -> float | None:
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    why = Topology.available()
    if why:
        pytest.skip(why)
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (Debian: systemd-container, debootstrap, util-linux)")
    cached, wheels = _rootfs(), _wheelhouse()
    root = tmp_path_factory.mktemp("nspawn") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(root)], check=True)
    _source_copy(root / "src")
    with Topology(prefix="ens") as topo:
        server = topo.serve()
        log = open(root.parent / "nspawn.log", "w")
        nspawn = subprocess.Popen(["systemd-nspawn", "-q", "-b", "-D", str(root), "--keep-unit", "--register=no",
                                   f"--network-namespace-path=/run/netns/{topo.client}",
                                   f"--bind-ro={wheels}:/wheels", "--machine=egress-test",
                                   # its own network namespace: a host's admin may manage it
                                   "--capability=CAP_NET_ADMIN"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  # The container has its own network namespace: let it set net.* sysctls
                                  # (conntrack accounting), as a host would.
                                  env=dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network"))
        try:
            leader = _leader(nspawn.pid)
            if leader is None:
                pytest.skip(f"systemd-nspawn could not boot the container here: "
                            f"{(root.parent / 'nspawn.log').read_text()[-1500:]}")
            b = Box(nspawn, leader, root)
            state = b.wait(lambda: b.sh("systemctl is-system-running", check=False).stdout.strip()
                           in ("running", "degraded"), timeout=90)
            if not state:
                pytest.skip("the container's systemd did not finish booting in 90 s: "
                            + b.sh("systemctl is-system-running; systemctl --failed", check=False).stdout)
            b.topo = topo
            yield b
        finally:
            nspawn.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                nspawn.wait(30)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(10)
            server.kill()
            log.close()
            (CACHE / "nspawn-report.txt").write_text("\n".join(REPORT) + "\n")
            shutil.rmtree(root, ignore_errors=True)


def _leader(nspawn_pid: int, timeout: float = 30.0) -> int | None:
    """The container's PID 1 (systemd), a child of systemd-nspawn."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split() \
                if Path(f"/proc/{nspawn_pid}").exists() else []:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        time.sleep(0.2)
    return None


def _note(title: str, text: str):
    REPORT.append(f"== {title}")
    REPORT.extend(text.rstrip().splitlines())


def test_readme_service_section_installs_and_starts(box):
    script = "set -e\n" + "\n".join("cd /src" if line.startswith("cd /path/to/egress-agent") else line
                                    for line in readme_service_commands())
    r = box.sh(script, check=False, timeout=900)
    assert r.returncode == 0 and "egress_agent_source_up" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-2000:] + box.sh("journalctl --no-pager -n 60 -o cat", check=False).stdout
    assert box.sh("systemctl is-active egress-agent.service", check=False).stdout.strip() == "active"
    assert box.sh("systemctl is-enabled nftables.service egress-agent-audit.timer").stdout.split() == \
        ["enabled", "enabled"]
    journal = box.journal("egress-agent")
    started = [line for line in journal.splitlines() if "Started egress-agent.service" in line]
    assert started, journal
    status = box.sh("systemctl status egress-agent --no-pager", check=False).stdout
    assert "attribution: uid only" in status, status
    warn = box.sh("journalctl -u egress-agent -p warning --no-pager -o cat", check=False).stdout
    assert "process attribution is off" in warn and "conntrack table is empty: the kernel may not" not in warn
    _note("READY (journal)", "\n".join(started + [line for line in journal.splitlines() if "running:" in line]))


def test_a_connection_is_judged_into_evidence_and_metrics(box):
    (box.root / "var/lib/GeoIP").mkdir(parents=True, exist_ok=True)
    build_city_mmdb(box.root / "var/lib/GeoIP/test-city.mmdb")
    with open(box.root / "etc/egress-agent/agent.yaml", "a") as f:
        f.write("geoip_databases: [/var/lib/GeoIP/test-city.mmdb]\npublic_nets: [203.0.113.0/24]\n")
    r = box.sh("systemctl reload egress-agent", check=False)
    assert r.returncode == 0, r.stderr + box.journal("egress-agent")
    box.sh("python3 -c \"import socket,time; s=socket.create_connection(('203.0.113.9',443),timeout=5); "
           "s.send(b'x'*300); time.sleep(2)\"")
    evidence = box.root / "var/lib/private/egress-agent/evidence.jsonl"
    lines = box.wait(lambda: [json.loads(x) for x in evidence.read_text().splitlines() if "203.0.113.9" in x]
                     if evidence.exists() else [], timeout=20)
    assert lines, box.journal("egress-agent")
    rec = lines[0]
    assert rec["flow"]["dst"] == "203.0.113.9" and rec["flow"]["dport"] == 443
    assert rec["flow"]["process"]["unattributed"] == "no-permission" and rec["flow"]["process"]["uid"] == 0
    m = box.metrics()
    assert _metric(m, "egress_agent_flows_total", country="US") >= 1, m
    assert _metric(m, "egress_agent_attribution_enabled", mode="process") == 0
    _note("evidence record", json.dumps(rec)[:600])


def test_reload_good_and_broken(box):
    bad = box.root / "etc/egress-agent/policies/broken.yaml"
    bad.write_text("version: 1\nname: broken\nhome: [EU]\nallow:\n  jurisdictions: [EUU]\n")
    r = box.sh("systemctl reload egress-agent", check=False)
    assert r.returncode != 0, r.stdout
    assert _metric(box.metrics(), "egress_agent_config_last_reload_successful") == 0
    assert box.sh("systemctl is-active egress-agent", check=False).stdout.strip() == "active"
    err = box.sh("journalctl -u egress-agent -p err --no-pager -o cat", check=False).stdout
    assert "unknown jurisdiction 'EUU'" in err, err
    bad.unlink()
    r = box.sh("systemctl reload egress-agent", check=False)
    assert r.returncode == 0, r.stderr
    assert _metric(box.metrics(), "egress_agent_config_last_reload_successful") == 1
    _note("reload (journal)", "\n".join(line for line in box.journal("egress-agent").splitlines()
                                        if re.search(r"Reload|reload", line)))


def test_audit_timer_service_succeeds(box):
    box.sh("install -d /var/spool/egress-agent && cp /src/examples/demo.pcap /var/spool/egress-agent/")
    box.sh("install -d /var/lib/prometheus/node-exporter")  # node_exporter's textfile folder (Debian's path)
    assert "egress-agent-audit.timer" in box.sh("systemctl list-timers --all --no-pager").stdout
    r = box.sh("systemctl start egress-agent-audit.service", check=False, timeout=300)
    journal = box.journal("egress-agent-audit")
    assert r.returncode == 0, r.stderr + journal
    assert box.sh("systemctl show -p Result --value egress-agent-audit.service").stdout.strip() == "success"
    report = json.loads((box.root / "var/lib/private/egress-agent-audit/report.json").read_text())
    assert report["verdicts"]["violation"] == 2
    # the result reached node_exporter's folder, readable by the collector, with the report's counts
    prom = box.root / "var/lib/prometheus/node-exporter/egress-agent-audit.prom"
    assert prom.stat().st_mode & 0o777 == 0o644
    text = prom.read_text()
    assert 'egress_agent_audit_violations{policy="gdpr-personal-data",severity="high"} 2.0' in text
    assert "egress_agent_audit_success 1.0" in text and "egress_agent_audit_exit_code 1.0" in text
    # a failed run (a file that is no capture) is exported too: success 0, no stale counts
    box.sh("echo garbage > /var/spool/egress-agent/zz-not-a-capture")
    box.sh("systemctl start egress-agent-audit.service", check=False, timeout=300)
    assert box.sh("systemctl show -p Result --value egress-agent-audit.service").stdout.strip() != "success"
    text = prom.read_text()
    assert "egress_agent_audit_success 0.0" in text and "egress_agent_audit_violations{" not in text, text
    box.sh("rm /var/spool/egress-agent/zz-not-a-capture")
    _note("audit timer's service (journal)", journal)


def test_watchdog_restarts_a_frozen_agent(box):
    dropin = box.root / "etc/systemd/system/egress-agent.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "test-watchdog.conf").write_text("[Service]\nWatchdogSec=3s\n")
    box.sh("systemctl daemon-reload && systemctl restart egress-agent")
    pid = int(box.sh("systemctl show -p MainPID --value egress-agent").stdout)
    restarts = int(box.sh("systemctl show -p NRestarts --value egress-agent").stdout)
    box.sh(f"kill -STOP {pid}")
    again = box.wait(lambda: int(box.sh("systemctl show -p NRestarts --value egress-agent").stdout) > restarts
                     and box.sh("systemctl is-active egress-agent", check=False).stdout.strip() == "active",
                     timeout=40)
    journal = box.journal("egress-agent")
    (dropin / "test-watchdog.conf").unlink()
    box.sh("systemctl daemon-reload")
    assert again, journal
    assert int(box.sh("systemctl show -p MainPID --value egress-agent").stdout) != pid
    lines = [line for line in journal.splitlines() if "atchdog" in line or "Scheduled restart" in line]
    assert any("Watchdog timeout" in line for line in lines), journal
    _note("watchdog restart (journal)", "\n".join(lines))


def test_exposure_scores_and_attribution_dropin(box):
    def score():
        out = box.sh("systemd-analyze security egress-agent.service --no-pager", check=False).stdout
        m = re.search(r"Overall exposure level for egress-agent.service: ([0-9.]+)", out)
        assert m, out
        return float(m.group(1))

    default = score()
    audit = box.sh("systemd-analyze security egress-agent-audit.service --no-pager", check=False).stdout
    audit_score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", audit).group(1)
    dropin = box.root / "etc/systemd/system/egress-agent.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "systemd/egress-agent.service.d/attribution.conf", dropin / "attribution.conf")
    box.sh("systemctl daemon-reload && systemctl restart egress-agent")
    with_attr = score()
    assert default < with_attr < 5.0
    m = box.wait(lambda: _metric(box.metrics(), "egress_agent_attribution_enabled", mode="process") == 1, timeout=15)
    assert m, box.journal("egress-agent")
    box.sh("python3 -c \"import socket,time; s=socket.create_connection(('203.0.113.10',443),timeout=5); "
           "s.send(b'x'*300); time.sleep(2)\" &  sleep 3")
    evidence = box.root / "var/lib/private/egress-agent/evidence.jsonl"
    rec = box.wait(lambda: [json.loads(x) for x in evidence.read_text().splitlines() if "203.0.113.10" in x],
                   timeout=20)
    assert rec and rec[0]["flow"]["process"].get("comm") == "python3", rec
    _note("exposure", f"egress-agent.service: {default} (default), {with_attr} (with attribution.conf); "
                      f"egress-agent-audit.service: {audit_score}")
    print("\n".join(REPORT))


def test_capture_dropin_names_flows_under_systemd(box):
    """capture.conf (CAP_NET_RAW, AF_PACKET) lets the hardened unit run the capture source: the unit
    starts, the capture source is up, and a TLS flow's evidence carries its SNI."""
    from tests.names import build

    dropin = box.root / "etc/systemd/system/egress-agent.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "systemd/egress-agent.service.d/capture.conf", dropin / "capture.conf")
    cfg = box.root / "etc/egress-agent/agent.yaml"
    original = cfg.read_text()
    cfg.write_text(original.replace("sources: [conntrack]", "sources: [conntrack, capture]"))
    try:
        box.sh("systemctl daemon-reload && systemctl restart egress-agent")
        up = box.wait(lambda: _metric(box.metrics(), "egress_agent_source_up", source="capture") == 1, timeout=20)
        assert up, box.journal("egress-agent")
        hello = build.records(build.client_hello("files.vendor.example")).hex()
        box.sh(f"python3 -c \"import socket,time; s=socket.create_connection(('203.0.113.11',443),timeout=5); "
               f"s.send(bytes.fromhex('{hello}')); time.sleep(2)\" &  sleep 3")
        evidence = box.root / "var/lib/private/egress-agent/evidence.jsonl"
        rec = box.wait(lambda: [json.loads(x) for x in evidence.read_text().splitlines() if "203.0.113.11" in x],
                       timeout=20)
        assert rec and rec[0]["flow"]["hostname"] == "files.vendor.example", rec
        out = box.sh("systemd-analyze security egress-agent.service --no-pager", check=False).stdout
        score = re.search(r"Overall exposure level for egress-agent.service: ([0-9.]+)", out).group(1)
        _note("exposure with capture.conf", f"egress-agent.service: {score} (attribution.conf and capture.conf)")
    finally:
        cfg.write_text(original)
        (dropin / "capture.conf").unlink()
        box.sh("systemctl daemon-reload && systemctl restart egress-agent", check=False)
