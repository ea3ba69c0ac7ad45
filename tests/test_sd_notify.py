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


def notify_socket(tmp_path, timeout: float):
    """A unix datagram socket standing in for systemd, and the environment that points at it."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(timeout)
    return sock, dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")


def test_notify_protocol(tmp_path):
    sock, env = notify_socket(tmp_path, 0.5)
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


def test_watchdog_keeps_pinging_through_a_long_reload(tmp_path):
    """2,000 policies take seconds to load; the pings must not stop while they do."""
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "p0.yaml").write_text("version: 1\nname: p0\nhome: [EU]\nallow: {jurisdictions: [HOME]}\n")
    sock, env = notify_socket(tmp_path, 0.2)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{free_port()}",
                             "--policies", str(pol), "--evidence", str(tmp_path / "ev.jsonl"), "--no-attribution"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: list[tuple[float, str]] = []

    def collect(until, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                seen.extend((time.monotonic(), x) for x in sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
            if until([x for _, x in seen]):
                return True
        return False

    try:
        assert collect(lambda s: "READY=1" in s)
        for i in range(1, 2000):
            (pol / f"p{i}.yaml").write_text(f"version: 1\nname: p{i}\nhome: [EU]\nallow: {{jurisdictions: [HOME]}}\n"
                                            f"deny: {{networks: [203.0.113.{i % 250}/32]}}\n")
        start = len(seen)
        proc.send_signal(signal.SIGHUP)
        assert collect(lambda s: "RELOADING=1" in s and s.count("READY=1") >= 2)
        during = seen[start:]
        t_reload = next(t for t, x in during if x == "RELOADING=1")
        t_ready = next(t for t, x in during if x == "READY=1")
        pings = [t for t, x in during if x == "WATCHDOG=1" and t_reload <= t <= t_ready]
        gaps = [b - a for a, b in zip([t_reload, *pings], [*pings, t_ready], strict=True)]
        assert t_ready - t_reload > 1.0, "the reload should take long enough to need pings"
        assert max(gaps) < 1.0, f"the watchdog went quiet for {max(gaps):.1f} s during the reload"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
