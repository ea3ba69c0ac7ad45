"""`egress-agent reload`: SIGHUP, wait for the daemon's recorded verdict, exit 0/1; 2 without a daemon."""

import subprocess
import sys

from tests.conftest import REPO

# A stand-in daemon: on SIGHUP it records a failed reload the way the real one does.
FAKE = """
import os, signal, sys, time
os.environ["RUNTIME_DIRECTORY"] = sys.argv[1]
from agent import reload_status
signal.signal(signal.SIGHUP, lambda *_: reload_status.write(sys.argv[2] == "ok", "2 problem(s) in policies"))
reload_status.write(True, "started")
print("ready", flush=True)
time.sleep(30)
"""


def test_reload_reports_the_daemons_verdict(tmp_path, cli):
    for verdict, code in (("ok", 0), ("bad", 1)):
        d = tmp_path / verdict
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-c", FAKE, str(d), verdict], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
        try:
            assert p.stdout.readline().strip() == "ready"
            r = cli("reload", "--status", d / "reload-status.json", "--timeout", "10")
            assert r.returncode == code, r.stderr
            if code:
                assert "reload failed, the previous policies stay in force: 2 problem(s)" in r.stderr
        finally:
            p.kill()


def test_reload_without_a_daemon_is_a_usage_error(tmp_path, cli):
    r = cli("reload", "--status", tmp_path / "none.json")
    assert r.returncode == 2 and "reload: no daemon pid" in r.stderr and "Traceback" not in r.stderr
