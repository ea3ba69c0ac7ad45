"""Loss accounting against the kernel's own count, as root, in namespaces made here.

Every test checks the contract of `agent.accounting`: kernel flows = judged + dropped (by reason)
+ queued + unaccounted, with unaccounted driven to 0. Documentation addresses only.
"""

import pytest

from tests.agent_process import Agent, wait_for
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]

DROPS = ("sampled", "rate_limited", "queue_full", "overflow", "error")


@pytest.fixture
def topo():
    with Topology("eal") as t:
        yield t


def books(a):
    """(kernel, judged, drops by reason, queued, unaccounted) from one scrape."""
    v = a.value
    return (v("egress_agent_kernel_flows_total"), v("egress_agent_flows_judged_total"),
            {r: v("egress_agent_source_drops_total", reason=r) for r in DROPS},
            v("egress_agent_flows_queued"), v("egress_agent_flows_unaccounted"))


def settled(a, kernel_expected):
    def ok():
        k, j, d, q, u = books(a)
        return k == kernel_expected and q == 0 and u == 0 and j + sum(d.values()) == k and (k, j, d)
    try:
        return wait_for(ok, timeout=40, what=f"books to balance at {kernel_expected} kernel flows")
    except AssertionError as e:  # say what the books were at the end, not at the start
        raise AssertionError(f"{e}: (kernel, judged, drops, queued, unaccounted) = {books(a)}\n{a.logtext()[-3000:]}") \
            from None


def test_storm_of_short_flows_into_a_tiny_buffer_adds_up(topo, tmp_path):
    """The kernel drops events; flows that ended before the resync are booked as overflow."""
    topo.enable_conntrack()
    topo.run("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=1")
    a = Agent(tmp_path, topo, rcvbuf=4096).start()
    try:
        topo.fill_udp(30000)
        kernel, judged, drops = settled(a, 30000)
        assert a.value("egress_agent_source_events_lost_total") > 0
        assert drops["overflow"] > 0, "the storm should have lost flows the dump could not find"
        assert judged > 0
        assert abs(a.value("egress_agent_sampling_ratio") - judged / kernel) < 1e-6
        assert a.value("egress_agent_loss_accounting") == 1
    finally:
        assert a.stop() == 0, a.logtext()


def test_sampling_is_counted_and_the_ratio_is_the_kernels(topo, tmp_path):
    topo.enable_conntrack(udp_timeout=60)
    a = Agent(tmp_path, topo)
    import json

    cfg = json.loads(a.config.read_text())
    cfg["sampling"] = {"one_in": 4}
    a.config.write_text(json.dumps(cfg))
    a.start()
    try:
        topo.fill_udp(4000)
        kernel, judged, drops = settled(a, 4000)
        assert drops["sampled"] == kernel - judged and 700 < judged < 1300
        assert abs(a.value("egress_agent_sampling_ratio") - judged / 4000) < 1e-6
    finally:
        assert a.stop() == 0, a.logtext()


@pytest.mark.parametrize("kernel_filter", [True, False])
def test_irrelevant_storm_is_filtered_in_the_kernel(topo, tmp_path, kernel_filter):
    """Loopback flows never reach Python with the socket filter on (the control: with it off,
    every event is read and dropped in Python). Either way the books balance on egress alone."""
    topo.enable_conntrack(udp_timeout=60)
    a = Agent(tmp_path, topo, kernel_filter=kernel_filter).start()
    try:
        topo.fill_udp(20000, net="127.0.0")
        topo.fill_udp(1000)  # then real egress
        settled(a, 1000)
        read = a.value("egress_agent_source_events_total", event="new")
        assert read == (1000 if kernel_filter else 21000)
    finally:
        assert a.stop() == 0, a.logtext()


def test_missing_counter_is_reported_not_guessed(topo, tmp_path):
    topo.run("nft", "add table inet other; add chain inet other c { type filter hook output priority 0; "
             "ct state new counter; }")  # tracking on, but not the agent's counter
    a = Agent(tmp_path, topo, enable=False).start()
    try:
        assert a.value("egress_agent_loss_accounting") == 0
        assert a.value("egress_agent_kernel_flows_total") is None or a.value("egress_agent_kernel_flows_total") == 0
        assert "loss accounting is off" in a.logtext()
    finally:
        assert a.stop() == 0, a.logtext()


def test_a_reload_that_changes_public_networks_rebuilds_the_kernel_side(topo, tmp_path):
    """The socket filter and the nft sets come from the scope table: a reload that makes
    198.51.100.0/24 local must stop judging it, one that makes it public again must resume."""
    import json
    import signal

    topo.enable_conntrack(udp_timeout=60)
    a = Agent(tmp_path, topo).start()
    try:
        cfg = json.loads(a.config.read_text())
        cfg["public_nets"] = ["203.0.113.0/24", "2001:db8::/32"]  # 198.51.100.0/24 is documentation again
        a.config.write_text(json.dumps(cfg))
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "rebuilt from the new scope table" in a.logtext(), what="rescope")
        topo.fill_udp(50, net="198.51.100")
        topo.fill_udp(30, net="203.0.113")
        settled(a, 30)  # only the 203.0.113 flows are egress now, in the kernel and in Python
        cfg["public_nets"].append("198.51.100.0/24")
        a.config.write_text(json.dumps(cfg))
        a.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: a.logtext().count("rebuilt from the new scope table") == 2, what="second rescope")
        topo.run("python3", "-c", "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "[s.sendto(b'x', ('198.51.100.%d' % (1 + i), 3000 + i)) for i in range(20)]")
        settled(a, 50)
    finally:
        assert a.stop() == 0, a.logtext()


def test_a_deleted_counter_turns_accounting_off_and_back_on(topo, tmp_path):
    """An operator deletes the table under the running agent: the agent says so (metric and log)
    instead of exporting stale books, and resumes when the table is back."""
    topo.enable_conntrack(udp_timeout=60)
    a = Agent(tmp_path, topo).start()
    try:
        wait_for(lambda: a.value("egress_agent_loss_accounting") == 1, what="accounting on")
        topo.run("nft", "delete table inet egress_agent")
        wait_for(lambda: a.value("egress_agent_loss_accounting") == 0, what="accounting off")
        assert "can no longer be read" in a.logtext()
        topo.enable_conntrack(udp_timeout=60)  # the table again, its counter from zero
        wait_for(lambda: a.value("egress_agent_loss_accounting") == 1, what="accounting back")
        before = a.value("egress_agent_kernel_flows_total")
        topo.fill_udp(40)
        settled(a, before + 40)
        assert a.proc.poll() is None
    finally:
        assert a.stop() == 0, a.logtext()
