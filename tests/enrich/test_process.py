import os

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
    from agent.sources.conntrack_source import RateLimit

    r = RateLimit(2)
    assert [r.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert r.allow("b", 0.0) and r.allow("a", 1.0)
