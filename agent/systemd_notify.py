"""sd_notify without libsystemd: READY, RELOADING, STOPPING, WATCHDOG over $NOTIFY_SOCKET.

Does nothing when not started by systemd. `watchdog_interval()` is half of $WATCHDOG_USEC (the
pace systemd recommends), or None.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False


def reloading():
    notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}", "STATUS=reloading policies")


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
