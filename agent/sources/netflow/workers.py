"""The collector's worker processes (`netflow: {workers: N}`): one Collecting each, on its own
SO_REUSEPORT sockets, shipping items and tallies to the source thread of the agent.

Contract: `WorkerPool(kind, socket_groups, settings)` starts one process per group of sockets
(spawned, not forked: the agent has threads); `run(stop, source)` receives what they ship and hands
it over through `source.hand_over`, restarts a worker that died (on the same sockets: the agent
keeps them open, so nothing sent meanwhile is lost unless a buffer fills, which the exporter's
sequence numbers then count), and at stop asks each to end its connections and ship them.
`reconfigure(settings)` sends a reloaded config to every worker. Messages, parent to worker:
("settings", settings), ("stop",); worker to parent: ("batch", items, tally), ("done",).
"""

from __future__ import annotations

import logging
import multiprocessing
import select
import signal
import time
from multiprocessing.connection import wait

log = logging.getLogger("egress-agent")
SHIP_EVERY = 0.05  # seconds a worker holds what it made before shipping it
STOP_WAIT = 10.0  # seconds to wait for the workers' last connections at stop


def _exporters(settings: tuple):
    from agent.enrich.scope import Scoper
    from agent.sources.netflow.collect import Exporters

    cfg, public, local, _inbound = settings
    return Exporters(cfg, Scoper(public_nets=public, local_nets=local))


def _collecting(kind: str, settings: tuple, index: int):
    from agent.sources.netflow.collect import ID_BASE, Collecting

    return Collecting(kind, _exporters(settings), settings[3], id_base=ID_BASE + (index + 1 << 44))


def worker_main(kind: str, socks: list, settings: tuple, conn, index: int):
    """One worker process: read its sockets, decode and pair, ship; until told to stop or orphaned."""
    from agent.sources.netflow.collect import SWEEP_EVERY, read, round_for

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops its workers itself
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    col = _collecting(kind, settings, index)
    for s in socks:
        s.setblocking(False)
    by_fd = {s.fileno(): s for s in socks}
    gather = round_for(socks)
    last_sweep = last_ship = time.monotonic()
    while True:
        try:
            began = time.monotonic()
            ready = select.select([*by_fd, conn.fileno()], [], [], SHIP_EVERY)[0]
            if gather and ready and conn.fileno() not in ready:  # under load: datagrams gather (collect.ROUND)
                time.sleep(max(0.0, gather - (time.monotonic() - began)))
            for fd in ready:
                if fd != conn.fileno():
                    col.datagrams(read(by_fd[fd]), time.time())
                    continue
                try:
                    msg = conn.recv()
                except EOFError:
                    return  # the agent is gone
                if msg[0] == "settings":
                    col.reconfigure(_exporters(msg[1]), msg[1][3])
                elif msg[0] == "stop":
                    col.sweep(float("inf"))
                    conn.send(("batch", *col.take()))
                    conn.send(("done",))
                    return
            if time.monotonic() - last_sweep >= SWEEP_EVERY:
                last_sweep = time.monotonic()
                col.sweep(time.time())
            if time.monotonic() - last_ship >= SHIP_EVERY and (col.items or col.tally):
                last_ship = time.monotonic()
                conn.send(("batch", *col.take()))
        except (BrokenPipeError, ConnectionResetError):
            return  # the agent is gone
        except Exception:  # a bug or an input we did not foresee: count it, keep collecting
            log.exception("%s worker %d: could not read or decode export datagrams", kind, index)
            col.tally = col.give_up()  # shipped with the next batch: the books still add up
            time.sleep(0.1)


class WorkerPool:
    def __init__(self, kind: str, groups: list, settings: tuple):
        self.kind, self.groups, self.settings = kind, groups, settings
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list = [None] * len(groups)
        # each worker's connections judged and not yet ended, by id: if the worker dies, they end
        # here with the counters last shipped (the rest of their bytes died with it: counted)
        self.open: list[dict] = [{} for _ in groups]
        for i in range(len(groups)):
            self._start(i)

    def _start(self, i: int):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=worker_main, args=(self.kind, self.groups[i], self.settings, child, i),
                             name=f"ea-{self.kind}-{i}", daemon=True)
        p.start()
        child.close()
        self.workers[i] = (p, parent)

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.workers]

    def reconfigure(self, settings: tuple):
        self.settings = settings
        for _p, conn in self.workers:
            try:
                conn.send(("settings", settings))
            except OSError:
                pass  # a dead worker is started again with these settings

    def run(self, stop, source):
        m = source.d.metrics
        while not stop.is_set():
            if source.d.cfg is not source._cfg:
                source._reconfigure()
            conns = {conn: i for i, (_p, conn) in enumerate(self.workers)}
            for conn in wait(list(conns), timeout=0.25):
                i = conns[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    p, _ = self.workers[i]
                    p.join(timeout=1)
                    log.error("%s worker %d ended (exit code %s); starting it again; its %d open connection(s) end "
                              "with the counters it last sent", self.kind, i, p.exitcode, len(self.open[i]))
                    m.source_errors.labels(self.kind, "io").inc()
                    conn.close()
                    self._orphans(i, source)
                    self._start(i)
                    continue
                if msg[0] == "batch":
                    self._track(i, msg[1])
                    source.hand_over(msg[1], msg[2])
        self._stop(source)

    def _track(self, i: int, items: list):
        opened = self.open[i]
        for kind, e, _counted in items:
            if kind == "flow":
                opened[e.ct_id] = e
            elif kind == "destroy":
                opened.pop(e.ct_id, None)

    def _orphans(self, i: int, source):
        """A dead worker's open connections: ended with what was last shipped, counted as evicted."""
        gone = [("destroy", e, False) for e in self.open[i].values()]
        self.open[i] = {}
        if gone:
            source.hand_over(gone, {("evicted",): len(gone)})

    def _stop(self, source):
        """Ask every worker for its last connections; wait a bounded time; end the stragglers."""
        pending = {}
        for p, conn in self.workers:
            try:
                conn.send(("stop",))
                pending[conn] = p
            except OSError:
                continue
        end = time.monotonic() + STOP_WAIT
        while pending and time.monotonic() < end:
            for conn in wait(list(pending), timeout=max(0.0, end - time.monotonic())):
                i = next(k for k, (_p, c) in enumerate(self.workers) if c is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    pending.pop(conn).join(timeout=1)
                    self._orphans(i, source)
                    continue
                if msg[0] == "batch":
                    self._track(i, msg[1])
                    source.hand_over(msg[1], msg[2])
                elif msg[0] == "done":
                    pending.pop(conn).join(timeout=5)
        for conn, p in pending.items():
            log.error("%s worker did not stop in %g s; ended", self.kind, STOP_WAIT)
            p.kill()
            self._orphans(next(k for k, (_p, c) in enumerate(self.workers) if c is conn), source)
