"""Audit inputs: folders expanded, each file read by what its first bytes say it is.

Contract: `expand_inputs(names)` -> file paths (a folder means its regular files, sorted, not dot
files); `read_input(path)` -> (connections, stats dict, packets or None): a FlowTable with one row
per connection, oriented from its opener (`agent.connections`: the capture's one-way flows and a
flow log's lines paired the same way, whichever reader read them).
Every problem is a UserError naming the file. `BULK`: judge in bulk (`agent.judge.bulk`) unless a
report lists every flow; tests turn it off to compare the two paths, and `inventory` follows it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent.connections import connections
from agent.errors import UserError
from agent.flowtable import FlowTable
from agent.sources.capfile.reader import read_capture, sniff_format

PROGRESS_MIN_BYTES = 32 << 20
BULK = True


def expand_inputs(inputs) -> list[str]:
    out = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise UserError(f"{i}: folder has no files to audit")
            out.extend(files)
        elif p.exists():
            out.append(i)
        else:
            raise UserError(f"{i}: no such file")
    return out


def _progress(path: str):
    """A rich progress bar on a terminal for big files; None otherwise."""
    size = os.path.getsize(path)
    if size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(os.path.basename(path), total=size)
    bar.start()
    return bar, lambda done: bar.update(task, completed=done)


def read_input(path: str, export_ports: tuple[int, ...] = ()):
    """(flows, stats dict, packets or None) for one input file; a capture's flows come as a FlowTable.
    `export_ports`: a capture is read as NetFlow/IPFIX exports to those UDP ports (the flows they
    describe), not as the packets in it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None
    if not head:
        raise UserError(f"{path}: empty file, not a capture or flow log")
    fmt = sniff_format(head)
    if fmt == "jsonl":
        from agent.sources.flowlog.jsonl import read_jsonl
        from agent.sources.flowlog.table import read_jsonl_table

        got = read_jsonl_table(path)  # the plain log in bulk; None: read it line by line
        flows, stats = got if got is not None else read_jsonl(path)
        table = flows if isinstance(flows, FlowTable) else FlowTable.from_flows(flows)
        return connections(table), stats.to_json(), None
    if fmt is None:
        raise UserError(f"{path}: unknown file format (first bytes {head[:8].hex()}); "
                        "expected pcap, pcapng or JSON lines")
    if export_ports:
        from agent.sources.netflow.exports import read_exports

        flows, stats = read_exports(path, export_ports)
        return connections(FlowTable.from_flows(flows)), stats, None
    bar, cb = _progress(path)
    try:
        cap = read_capture(path, progress=cb)
    finally:
        if bar:
            bar.stop()
    return connections(cap.table), cap.stats.to_json(), cap.stats.packets
