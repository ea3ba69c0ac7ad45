"""The enforcer's books without a kernel: refusals the kernel counted reach the metric, each new
refused connection becomes an evidence item, and records that cannot be made are counted."""

from types import SimpleNamespace

from agent.enforce.compile import Plan, PolicySets
from agent.enforce.enforcer import Enforcer
from agent.enforce.nft import SEEN_SIZE
from agent.sinks.metrics import Metrics


class FakeNft:
    def __init__(self, packets, elems):
        self.packets, self.elems = packets, elems

    def json(self, cmd):
        if cmd.startswith("list counters"):
            return [{"counter": {"name": "p0", "packets": self.packets}}]
        if cmd.endswith("_seen4"):
            return [{"set": {"name": "p0_seen4", "elem": self.elems}}]
        return [{"set": {"name": "p0_seen6"}}]


def _enforcer(queued: bool):
    got = []

    def enqueue(batch, drops):
        got.extend(batch)
        return queued

    d = SimpleNamespace(metrics=Metrics(), cfg=SimpleNamespace(enforcement={}), _enqueue=enqueue)
    e = Enforcer(d, clock=lambda: 1.8e9)
    e.plan = Plan([PolicySets("eu", {4: [], 6: []}, True, (), (), ())], {4: [], 6: []})
    e.applied = True
    return e, d.metrics, got


def _elem(i):
    return {"elem": {"val": {"concat": ["192.0.2.1", f"203.0.113.{i % 250}", "tcp", 1000 + i]}, "expires": 100}}


def _value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0


def test_counts_and_one_item_per_new_refused_connection():
    e, m, got = _enforcer(queued=True)
    e.nft = FakeNft(5, [_elem(1), _elem(2)])
    e._poll()
    e.nft = FakeNft(9, [_elem(1), _elem(2), _elem(3)])  # one more connection, repeats of the others
    e._poll()
    assert _value(m, "egress_agent_enforcement_refused_total", policy="eu") == 9
    assert [(kind, r.dst, r.dport, r.proto) for kind, r, _ in got] == [
        ("refused", "203.0.113.1", 1001, 6), ("refused", "203.0.113.2", 1002, 6), ("refused", "203.0.113.3", 1003, 6)]
    assert _value(m, "egress_agent_enforcement_unrecorded_total", policy="eu") == 0


def test_records_lost_to_a_full_queue_or_a_full_set_are_counted():
    e, m, _ = _enforcer(queued=False)
    e.nft = FakeNft(2, [_elem(1), _elem(2)])
    e._poll()
    assert _value(m, "egress_agent_enforcement_unrecorded_total", policy="eu") == 2
    e2, m2, got = _enforcer(queued=True)
    full = [_elem(i) for i in range(SEEN_SIZE)]
    e2.nft = FakeNft(SEEN_SIZE + 500, full)  # 500 refusals the bounded set could not hold
    e2._poll()
    assert len(got) == SEEN_SIZE
    assert _value(m2, "egress_agent_enforcement_unrecorded_total", policy="eu") == 500


def test_garbage_from_the_kernel_is_skipped_not_fatal():
    e, m, got = _enforcer(queued=True)
    e.nft = FakeNft(1, [{"elem": {"val": "odd"}}, {"elem": {"val": {"concat": ["a"]}}}, 7, _elem(4)])
    e._poll()
    assert [r.dst for _k, r, _c in got] == ["203.0.113.4"]
