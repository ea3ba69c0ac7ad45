"""The daemon speaks systemd's notify protocol: READY, WATCHDOG, RELOADING on SIGHUP, STOPPING on SIGTERM.

A unix datagram socket stands in for systemd ($NOTIFY_SOCKET). The daemon watches the host's
conntrack table read-only (without CAP_NET_ADMIN the source reports itself down; the protocol is
the same).
"""

import os
import signal
import socket
import subprocess
import sys
import time

from tests.agent_process import REPO, free_port


def test_notify_protocol(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{free_port()}",
                             "--evidence", str(tmp_path / "ev.jsonl"), "--no-attribution"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env["WATCHDOG_PID"] = str(proc.pid)
    seen: list[str] = []

    def collect(until, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                seen.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
            if until(seen):
                return True
        return False

    try:
        assert collect(lambda s: "READY=1" in s), seen
        assert collect(lambda s: s.count("WATCHDOG=1") >= 2), seen  # every WatchdogSec/2
        proc.send_signal(signal.SIGHUP)
        assert collect(lambda s: "RELOADING=1" in s and s.count("READY=1") >= 2), seen
        assert any(x.startswith("MONOTONIC_USEC=") for x in seen)
        proc.send_signal(signal.SIGTERM)
        assert collect(lambda s: "STOPPING=1" in s), seen
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
