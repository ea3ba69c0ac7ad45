"""Opening input files safely: regular files only, never blocking.

Every reader of user-named files (policies, config, captures, flow logs' siblings, GeoIP databases)
goes through `open_regular`, so a FIFO, a device such as /dev/zero, or a folder named like an input
is refused at once with a clear message instead of blocking or reading forever.
"""

from __future__ import annotations

import os
import stat

from agent.errors import UserError


def open_regular(path, what: str = "file") -> tuple[int, os.stat_result]:
    """(fd, stat) of a regular file opened read-only; UserError naming the path otherwise.

    O_NONBLOCK makes opening a FIFO return at once (it would wait for a writer); the fd is checked
    with fstat, so what is read is what was checked. The caller closes the fd.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{path}: cannot read {what}: not a regular file")
    return fd, st


def files_signature(*paths) -> tuple:
    """What changes when a policy folder or config file is replaced (ConfigMap updates swap a symlink)."""
    sig = []
    for p in paths:
        if not p:
            continue
        try:
            entries = [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        except OSError:
            entries = [p]
        for e in entries:
            try:
                st = os.stat(e)
                sig.append((e, os.path.realpath(e), st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((e, None))
    return tuple(sig)
