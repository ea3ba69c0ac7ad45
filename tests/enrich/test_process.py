import os
import subprocess

import pytest

from agent.enrich.process import Attributor, Options, cgroup_identity


def test_cgroup_identity():
    assert cgroup_identity("0::/system.slice/nginx.service\n") == ("nginx.service", None)
    cid = "a" * 64
    assert cgroup_identity(f"0::/system.slice/docker-{cid}.scope\n") == (None, cid)
    assert cgroup_identity(f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{cid}.scope\n")[1] == cid
    assert cgroup_identity("0::/user.slice/user-1000.slice/session-2.scope\n") == ("session-2.scope", None)
    assert cgroup_identity("") == (None, None)


def test_process_details_from_an_injected_proc(tmp_path):
    proc = tmp_path / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "comm").write_text("curl\n")
    (proc / "4242" / "cgroup").write_text("0::/system.slice/backup.service\n")
    os.symlink("/usr/bin/curl", proc / "4242" / "exe")
    os.symlink("socket:[99]", proc / "4242" / "fd" / "3")
    a = Attributor(Options(proc=str(proc)))
    assert a.pid_of(99) == 4242
    who = a.process(4242, 0)
    assert (who.comm, who.exe, who.unit, who.user) == ("curl", "/usr/bin/curl", "backup.service", "root")


def test_rate_limit():
    from agent.sources.conntrack.source import RateLimit

    r = RateLimit(2)
    assert [r.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert r.allow("b", 0.0) and r.allow("a", 1.0)


UDP_SOCKETS = """
import os, socket, sys, time
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
free = socket.socket(fam, socket.SOCK_DGRAM)
free.sendto(b'x', (sys.argv[1], 443))   # unconnected: no remote address of its own
tied = socket.socket(fam, socket.SOCK_DGRAM)
tied.connect((sys.argv[1], 443))
tied.send(b'y')
for s in (free, tied):
    print(s.getsockname()[0], s.getsockname()[1], os.fstat(s.fileno()).st_ino, flush=True)
time.sleep(30)
"""


@pytest.mark.root
@pytest.mark.parametrize("dst", ["203.0.113.9", "2001:db8:de::7"])
def test_udp_sockets_are_found_by_exact_lookup(dst, monkeypatch):
    """Unconnected and connected UDP sockets are found by one exact sock_diag lookup (the kernel
    reads UDP requests remote end first), not by the periodic table of UDP sockets by port."""
    from agent.flow import Flow
    from tests.netns import Topology

    why = Topology.available()
    if why is not None:
        pytest.skip(f"network namespaces: {why}")
    with Topology("eaud") as t:
        p = t.popen("python3", "-c", UDP_SOCKETS, dst, stdout=subprocess.PIPE, text=True)
        try:
            socks = [p.stdout.readline().split() for _ in range(2)]
            a = Attributor(Options(netns=t.client))
            monkeypatch.setattr(a, "_udp_table", lambda fam: pytest.fail("fell back to the UDP table"))
            for src, sport, inode in socks:
                assert a.socket_of(Flow(17, src, int(sport), dst, 443)) == (0, int(inode))
            monkeypatch.undo()
            assert a.socket_of(Flow(17, socks[0][0], 9, dst, 443)) is None  # no socket on that port
            a.close()
        finally:
            p.kill()
            p.wait()


@pytest.mark.root
@pytest.mark.parametrize("c_module", [True, False])
def test_prefetch_answers_as_lookups_one_by_one(monkeypatch, c_module):
    """A batch of exact requests in one send (`prefetch`) finds the same sockets, and the same
    missing ones, as one request per flow; `socket_of` then asks nothing more."""
    import agent.enrich.process as proc
    from agent.flow import Flow
    from tests.netns import Topology

    if not c_module:
        monkeypatch.setattr(proc, "_c_diag", None)
    elif proc._c_diag is None:
        pytest.skip("the C module is not built")
    why = Topology.available()
    if why is not None:
        pytest.skip(f"network namespaces: {why}")
    with Topology("eapf") as t:
        ps = [t.popen("python3", "-c", UDP_SOCKETS, dst, stdout=subprocess.PIPE, text=True)
              for dst in ("203.0.113.9", "2001:db8:de::7")]
        try:
            flows = []
            for p, dst in zip(ps, ("203.0.113.9", "2001:db8:de::7"), strict=True):
                for _ in range(2):
                    src, sport, _inode = p.stdout.readline().split()
                    flows += [Flow(17, src, int(sport), dst, 443), Flow(17, src, 9, dst, 443),  # 9: no socket
                              Flow(6, src, int(sport), dst, 443)]  # no TCP socket on that port
            flows *= 40  # more answers than one recvmmsg reads
            flows.append(Flow(1, "10.0.0.1", 0, "203.0.113.9", 0))  # ICMP: not asked
            one = Attributor(Options(netns=t.client))
            want = [one.socket_of(f) for f in flows]
            assert sum(w is not None for w in want) == 4 * 40
            batch = Attributor(Options(netns=t.client))
            batch._udp_table = lambda fam: {}  # answers come from the batch alone
            assert batch.prefetch(flows) > 0
            monkeypatch.setattr(batch, "_exact", lambda *a: pytest.fail("asked again after prefetch"))
            distinct = {(f.proto, f.src, f.sport, f.dst, f.dport): f for f in flows}
            got = {k: batch.socket_of(f) for k, f in distinct.items()}
            assert got == {(f.proto, f.src, f.sport, f.dst, f.dport): w for f, w in zip(flows, want, strict=True)}
            # the daemon's own events (conntrack.CtEntry, a tuple) ask the same
            from agent.sources.conntrack.table import CtEntry

            ct = Attributor(Options(netns=t.client))
            ct._udp_table = lambda fam: {}
            assert ct.prefetch([CtEntry(i, f.proto, f.src, f.sport, f.dst, f.dport, 1, 1, 0, None, None)
                                for i, f in enumerate(flows)]) > 0
            monkeypatch.setattr(ct, "_exact", lambda *a: pytest.fail("asked again after prefetch"))
            assert {k: ct.socket_of(f) for k, f in distinct.items()} == got
            one.close()
            batch.close()
            ct.close()
        finally:
            for p in ps:
                p.kill()
                p.wait()
