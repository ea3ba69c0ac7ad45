"""The table in a real kernel (root, a namespace of its own): a replacement that the kernel refuses
leaves the table in force, whole."""

import subprocess
import threading
import uuid

import pytest

from agent.enforce.compile import Plan, PolicySets
from agent.enforce.enforcer import enter_netns
from agent.enforce.nft import TABLE, Nft, NftError, render
from tests.netns import Topology

WHY = Topology.available()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")]


def _plan(spans):
    p = PolicySets("p", {4: [], 6: []}, True, (), (), ())
    p.dst[4] = spans
    return Plan([p], {4: [(2130706432, 2147483647)], 6: []})


def test_a_replacement_the_kernel_refuses_keeps_the_table():
    ns = f"eanft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    out = {}

    def work():
        enter_netns(ns)
        n = Nft()
        n.run(render(_plan([(3405803776, 3405803903)])))  # 203.0.113.0/25
        bad = render(_plan([(3405803904, 3405804031)]), replace=True).replace("jump refuse", "jump nowhere")
        try:
            n.run(bad)
        except NftError as e:
            out["error"] = str(e)
        out["after"] = n.run(f"list set inet {TABLE} p0_dst4")
        n.close()

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert "nowhere" in out["error"] or "No such file" in out["error"], out
        assert "203.0.113.0/25" in out["after"] and "203.0.113.128" not in out["after"]
        left = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True)
        assert TABLE not in left.stdout  # the owner's socket closed: gone
    finally:
        subprocess.run(["ip", "netns", "del", ns])
