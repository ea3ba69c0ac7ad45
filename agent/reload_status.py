"""The outcome of the daemon's latest (re)load, in a small file, so `egress-agent reload` can wait.

systemd 252 (Debian 12) has no `Type=notify-reload`, and `ExecReload=kill -HUP` returns before the
reload happens and succeeds even when it fails. So the daemon records each outcome in
`$RUNTIME_DIRECTORY/reload-status.json` (systemd's `RuntimeDirectory=egress-agent`):
`{"pid", "seq", "ok", "message", "time"}`, replaced atomically; `egress-agent reload` sends SIGHUP
and waits for a new `seq` from that pid, then exits 0 (reloaded) or 1 (failed, with the reason).
Without $RUNTIME_DIRECTORY nothing is written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

NAME = "reload-status.json"
_seq = 0


UNIT_RUNTIME = "/run/egress-agent"  # the shipped unit's RuntimeDirectory=egress-agent


def default_path(for_reading: bool = False) -> str | None:
    """$RUNTIME_DIRECTORY's status file (the daemon under systemd writes it); for `reload` from a
    shell, where that variable is not set, the shipped unit's file when it exists."""
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if base:
        return os.path.join(base, NAME)
    unit = os.path.join(UNIT_RUNTIME, NAME)
    return unit if for_reading and os.path.exists(unit) else None


def write(ok: bool, message: str, path: str | None = None) -> None:
    global _seq
    path = path or default_path()
    if not path:
        return
    _seq += 1
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "seq": _seq, "ok": ok, "message": message, "time": time.time()}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a status file is a convenience for `reload`; the metric and the log say the same


def read(path: str) -> dict | None:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def run_reload(args) -> int:
    """`egress-agent reload`: SIGHUP the daemon and wait for its verdict on the new configuration."""
    from agent.errors import UserError

    path = args.status or default_path(for_reading=True)
    if not path:
        raise UserError(f"reload: no status file: $RUNTIME_DIRECTORY is not set and {UNIT_RUNTIME}/{NAME} does "
                        "not exist; pass --status FILE (the daemon writes it in its RuntimeDirectory), or use "
                        "`systemctl reload egress-agent`")
    before = read(path)
    pid = args.pid or (before or {}).get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise UserError(f"reload: no daemon pid (pass --pid; {path} names none)")
    mark = (before or {}).get("pid"), (before or {}).get("seq")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise UserError(f"reload: cannot signal pid {pid} ({e.strerror})") from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        now = read(path)
        if now and now.get("pid") == pid and (now.get("pid"), now.get("seq")) != mark:
            if now.get("ok"):
                print(f"egress-agent: {now.get('message')}")
                return 0
            print(f"egress-agent: reload failed, the previous policies stay in force: {now.get('message')}",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"egress-agent: reload: no answer from pid {pid} within {args.timeout:g} s", file=sys.stderr)
    return 1
