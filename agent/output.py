"""Writing what the commands produce, and where the shipped data is: shared by the CLI, the
commands, the sinks and the daemon (so none of them imports `cli.py` back).

Contract: `write_output(data, path)` writes standard output (no path, or `-`) or FILE, a regular
file atomically (never half a report), anything else in place (never replaced); failures are
UserError naming the path. `dumps(obj, pretty)` is UTF-8 JSON bytes ending in a newline.
`shipped_policies()` is `./policies` when present, else the set installed with the package.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from agent.errors import UserError


def shipped_policies() -> Path:
    """`./policies` when present, else the set installed with the package."""
    local = Path("policies")
    if local.is_dir():
        return local
    import importlib.util

    spec = importlib.util.find_spec("egress_policies")  # a data-only namespace package: its folder
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no ./policies folder and no shipped policies installed; pass --policies PATH")
    return Path(list(spec.submodule_search_locations)[0])


def write_output(text, path: str | None):
    """Write a report (str, bytes, or an iterable of bytes written as it comes): standard output
    (no path, or `-`), or FILE.

    A regular file (or a new one) is written whole, so a reader never sees half: a fresh temporary
    file in the same folder (mkstemp: O_EXCL, unpredictable name, so a planted symlink cannot
    redirect it), mode 0640 less the umask, then an atomic rename. Anything else — a device such as
    /dev/null, a FIFO, /dev/stdout — is opened and written in place and never replaced or removed:
    renaming over /dev/null as root would break every program on the host.
    """
    if isinstance(text, (bytes, str)):
        chunks = [text if isinstance(text, bytes) else text.encode()]
    else:  # an iterable of bytes: written as it comes (a large report is never held whole)
        chunks = text
    if not path or path == "-":
        out = getattr(sys.stdout, "buffer", None)
        if out is None:  # a text-only stream (a test's StringIO)
            sys.stdout.write(b"".join(chunks).decode())
            return
        sys.stdout.flush()
        for c in chunks:
            out.write(c)
        out.flush()
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"{path}: cannot write report ({e.strerror})") from None
    try:
        if st is not None and not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise UserError(f"{path}: cannot write report (is a folder)")
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for c in chunks:
                    _write_all(fd, c)
            finally:
                os.close(fd)
            return
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o640 & ~umask)
            for c in chunks:
                _write_all(fd, c)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
    except OSError as e:
        raise UserError(f"{path}: cannot write report ({e.strerror})") from None


def _write_all(fd: int, data: bytes):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def dumps(obj, pretty: bool) -> bytes:
    """UTF-8 JSON, indented for a person at a terminal, compact otherwise. orjson (~10x json's
    encoder on a report listing every violation; UTF-8 rather than \\u escapes); json where orjson
    refuses a value (an integer beyond 64 bits)."""
    try:
        import orjson

        return orjson.dumps(obj, option=(orjson.OPT_INDENT_2 if pretty else 0) | orjson.OPT_APPEND_NEWLINE)
    except (ImportError, TypeError):
        return (json.dumps(obj, indent=2 if pretty else None, ensure_ascii=False) + "\n").encode()


FULL_WIDTH = 1 << 16  # "no width": a line is never wrapped or cut for a pipe or a file


def text_console(file=None):
    """The rich Console a text report is rendered on. A terminal: its own width (tables stay
    legible at 80 columns: see the report's renderers). A pipe, a file or `--output`: full lines,
    no wrapping, no cutting, no colour codes, so `grep` finds whole verdict sentences."""
    from rich.console import Console

    if file is None and sys.stdout.isatty():
        return Console()
    return Console(file=file, width=FULL_WIDTH, soft_wrap=True, force_terminal=False, no_color=True,
                   highlight=False, emoji=False)


def render_text(render, path: str | None):
    """Render a text report with `render(console)` to standard output or FILE (see write_output)."""
    if not path or path == "-":
        render(text_console())
        return
    import io

    buf = io.StringIO()
    render(text_console(buf))
    write_output(buf.getvalue(), path)
