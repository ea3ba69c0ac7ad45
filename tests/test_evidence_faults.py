"""Evidence under faults, in the real daemon (root: a small tmpfs stands in for a full disk)."""

import json
import os
import subprocess
import sys

import pytest

from tests.agent_process import REPO, Agent, wait_for
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]


@pytest.fixture
def topo():
    with Topology("eae") as t:
        yield t


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_loses_counted_lines_never_a_torn_one_and_marks_the_gap(topo, tmp_path, small_disk):
    a = Agent(tmp_path, topo, enable=True)
    cfg = json.loads(a.config.read_text())
    a.evidence = small_disk / "evidence.jsonl"
    cfg["evidence"]["path"] = str(a.evidence)
    a.config.write_text(json.dumps(cfg))
    a.start()
    try:
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            for size in (4096, 64, 1):
                while os.write(fd, b"\0" * size) == size:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)
        topo.fill_udp(100)  # violations: each wants an evidence line
        wait_for(lambda: (a.value("egress_agent_evidence_errors_total") or 0) > 0, what="lost lines counted")
        assert a.proc.poll() is None
        os.unlink(filler)  # space returns
        lines_then = a.value("egress_agent_evidence_lines_total")
        c, _pid = topo.connect("udp", "203.0.113.250", port=9, hold=1)
        c.wait()
        wait_for(lambda: a.value("egress_agent_evidence_lines_total") > lines_then, what="writing again")
        raw = a.evidence.read_bytes()
        recs = [json.loads(x) for x in raw.splitlines()]  # every line whole: nothing torn or glued
        gaps = [r for r in recs if r.get("event") == "gap"]
        assert gaps and all(g["reason"] == "write-failed" and "No space left" in g["error"] for g in gaps)
        # every lost line is in a gap record (a nearly full disk can lose some and take others)
        assert sum(g["lost_lines"] for g in gaps) == a.value("egress_agent_evidence_errors_total")
        assert a.value("egress_agent_evidence_gaps_total") == len(gaps)
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert "evidence log" in a.logtext() and "line(s) lost" in a.logtext()
        # the log is still an audit input, and the audit names the gap
        r = subprocess.run([sys.executable, "-m", "agent", "audit", "--format", "json", str(a.evidence)],
                           cwd=REPO, capture_output=True, text=True)
        assert r.returncode in (0, 1), r.stderr
        assert "evidence gap (write-failed" in r.stdout + r.stderr
    finally:
        assert a.stop() == 0, a.logtext()


def test_symlinked_evidence_path_is_refused_at_start(topo, tmp_path):
    a = Agent(tmp_path, topo)
    target = tmp_path / "not-evidence"
    target.write_text("keep me\n")
    a.evidence.symlink_to(target)
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(a.config)], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert target.read_text() == "keep me\n"
