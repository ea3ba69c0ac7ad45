"""Name the calling OS thread (what `top -H`, `ps -L` and /proc/PID/task/TID/comm show).

CPython 3.11 leaves every thread named after the process, so an operator cannot tell which of the
daemon's threads uses the CPU; bench_live reads these names to split the agent's CPU by thread.
Best effort: a kernel or libc without prctl leaves the name as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util

PR_SET_NAME = 15
_libc = None


def set_native_name(name: str) -> bool:
    """Set this thread's kernel name (at most 15 bytes are kept); True when it took."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def named(target, name: str):
    """`target` wrapped to name its thread first (for threading.Thread(target=...))."""

    def run(*args, **kwargs):
        set_native_name(name)
        return target(*args, **kwargs)

    return run
