"""The conntrack source's two loops over a drain: the general one (any reader, sampling, rate limits)
and the reduced one for the C reader's drains (`ConntrackSource._plain`) hand the worker the same
batches and count the same events, arrivals and flows kept."""

from __future__ import annotations

import random
import threading

import pytest

from agent.config import Config
from agent.enrich.scope import Scoper
from agent.sinks.metrics import Metrics
from agent.sources.conntrack import source as cs
from agent.sources.conntrack.table import CtEntry


def _drains(seed: int) -> list[list]:
    """Drains as the C reader makes them: NEW events classified (accountable or not), DESTROY events
    for flows seen and unseen, a NEW delivered twice, more events than a batch holds."""
    rnd = random.Random(seed)
    live: list[CtEntry] = []
    drains = []
    for d in range(6):
        evs = []
        for i in range(rnd.choice([5, 300, cs.BATCH + 50])):
            if live and rnd.random() < 0.35:
                e = live.pop(rnd.randrange(len(live)))
                evs.append(("destroy", e._replace(packets=e.packets + 1), None))
                continue
            e = CtEntry(d * 100_000 + i, rnd.choice([6, 17]), "10.0.0.5", 1024 + i, f"203.0.113.{i % 250}", 443,
                        1, 60, 0, None, None)
            live.append(e)
            evs.append(("new", e, rnd.random() < 0.9))
            if rnd.random() < 0.02:
                evs.append(("new", e, True))  # delivered again
        evs += [("destroy", CtEntry(999_999, 6, "10.0.0.9", 9, "203.0.113.9", 9, 1, 1, 0, None, None), None)]
        drains.append(evs)
    return drains


class _Ct:
    needs_dump = False
    overflows = 0
    skipped_new = 0

    def __init__(self, drains, as_list: bool, stop):
        self.drains, self.as_list, self.stop = list(drains), as_list, stop

    def events(self, timeout, table):
        if not self.drains:
            self.stop.set()
            return []
        evs = self.drains.pop(0)
        return list(evs) if self.as_list else iter(evs)

    def socket_drops(self):
        return 0

    def close(self):
        pass


class _Daemon:
    def __init__(self):
        self.cfg = Config()
        self.metrics = Metrics()
        self.metrics.source(cs.SOURCE)
        self.stop, self.rescope = threading.Event(), threading.Event()
        self.pipeline = type("P", (), {"scoper": Scoper(), "inbound": False})()
        self.seen_new = self.kept_new = self.pending_flows = 0
        self.batches: list = []

    def _enqueue(self, batch, drops):
        self.batches.append(list(batch))


def _run(drains, as_list: bool, monkeypatch):
    d = _Daemon()
    src = cs.ConntrackSource(d)
    opened = []

    def _open(m, acct):  # a second open means the loop failed: it gets nothing more, and stops
        opened.append(1)
        if len(opened) > 1:
            d.stop.set()
        return _Ct(drains if len(opened) == 1 else [], as_list, d.stop)

    monkeypatch.setattr(src, "_open", _open)
    monkeypatch.setattr(src, "_account", lambda *a: None)
    monkeypatch.setattr(cs, "_tracking_rule_present", lambda netns: True)

    class _Counter:
        error = None
        inbound = inbound_counted = False

        def __init__(self, netns):
            pass

        def read(self):
            return None

    import agent.sources.conntrack.kernel_count as kc

    monkeypatch.setattr(kc, "KernelCounter", _Counter)
    import agent.sources.conntrack.table as ct_mod

    monkeypatch.setattr(ct_mod, "scope_table", lambda scoper, inbound=0: "table")  # what the C reader is handed
    src.run(d.stop)
    assert len(opened) == 1, "the source loop failed and reopened"
    events = {k: d.metrics.source_events.labels(cs.SOURCE, k)._value.get() for k in ("new", "destroy")}
    return d.batches, events, src.loss.arrived, d.seen_new, d.kept_new


@pytest.mark.parametrize("seed", [1, 2])
def test_reduced_loop_equals_the_general_one(monkeypatch, seed):
    drains = _drains(seed)
    plain = _run(drains, True, monkeypatch)
    monkeypatch.undo()
    general = _run(drains, False, monkeypatch)
    assert [e for b in plain[0] for e in b] == [e for b in general[0] for e in b]  # the same events, in order
    assert all(len(b) <= cs.BATCH for b in plain[0])
    assert plain[1:] == general[1:]
    assert plain[2] > 0 and plain[1]["destroy"] > 0
