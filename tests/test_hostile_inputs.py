"""Every hostile input found so far, with its exact message and exit code (issue: hostile inputs).

Each case here once ended in a traceback, a hang, a silent wrong answer or unbounded resources.
Captures that reproduce pcapng defects also live as golden folders in tests/cases/.
"""

import os
import shutil
import stat
import struct
import sys

import pytest
from scapy.all import IP, UDP, Ether

from agent import yamlio
from agent.errors import UserError
from agent.sources.capfile import walk as pcap_mod
from agent.sources.capfile.reader import read_capture
from agent.sources.flowlog.jsonl import read_jsonl
from tests.helpers import write_pcap, write_pcapng

FLOW = '"proto": "tcp", "src": "10.0.0.5", "dst": "203.0.113.9", "dport": 443'


# -- JSON lines: one validator, file:line: field: message, exit 2 ------------------------------
@pytest.mark.parametrize("line,message", [
    (f'{{{FLOW}, "first_seen": NaN}}', "f.jsonl:1: not valid JSON (NaN is not a number JSON allows)"),
    (f'{{{FLOW}, "first_seen": Infinity}}', "f.jsonl:1: not valid JSON (Infinity is not a number JSON allows)"),
    (f'{{{FLOW}, "first_seen": 1e300}}', "f.jsonl:1: first_seen: 1e+300 is out of range (1970-01-01 to 9999-12-31)"),
    (f'{{{FLOW}, "first_seen": -5}}', "f.jsonl:1: first_seen: -5 is out of range (1970-01-01 to 9999-12-31)"),
    (f'{{{FLOW}, "last_seen": "0001-01-01T00:00:00Z"}}',
     "f.jsonl:1: last_seen: '0001-01-01T00:00:00Z' is out of range (1970-01-01 to 9999-12-31)"),
    (f'{{{FLOW}, "conntrack_id": [1]}}', "f.jsonl:1: conntrack_id: [1] is not an integer in 0-4294967295"),
    ('{{{}, "bytes": {}}}'.format(FLOW, "9" * 5000), "f.jsonl:1: not valid JSON (a number with 5000 digits)"),
    ('{"proto": "\u00b2", "src": "10.0.0.5", "dst": "203.0.113.9"}', "f.jsonl:1: proto: '\u00b2' is not a protocol"),
    ("[" * 100000 + "]" * 100000, "f.jsonl:1: JSON nested too deeply"),
    (f'{{{FLOW}, "process": {{"comm": 5}}}}', "f.jsonl:1: process.comm: 5 is not a string"),
    (f'{{{FLOW}, "process": {{"pid": "x"}}}}', "f.jsonl:1: process.pid: 'x' is not an integer in 0-4294967295"),
    (f'{{{FLOW}, "process": []}}', "f.jsonl:1: process: expected an object"),
    (f'{{{FLOW}, "hostname": {{"a": 1}}}}', 'f.jsonl:1: hostname: {"a": 1} is not a string'),
    ('{"proto": "tcp", "src": 5, "dst": "203.0.113.9"}', "f.jsonl:1: src: 5 is not an IP address"),
    ('{"flow": {"proto": "tcp", "src": "10.0.0.5", "dst": "x"}}', "f.jsonl:1: flow.dst: 'x' is not an IP address"),
])
def test_jsonl_field_errors(tmp_path, line, message):
    p = tmp_path / "f.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        read_jsonl(str(p))
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(message), str(e.value)[:300]


def test_jsonl_long_line_is_bounded(tmp_path, cli):
    p = tmp_path / "long.jsonl"
    with open(p, "wb") as f:
        f.write((f'{{{FLOW}}}\n').encode())
        f.write(b'{"proto": "tcp", "pad": "' + b"x" * (3 << 20) + b'"}\n')
    r = cli("audit", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{p}:2: line longer than 1,048,576 bytes (byte offset {len(FLOW) + 3}); not a flow record" in r.stderr


# -- YAML: one bounded loader for policies, config and tests ----------------------------------
def _yaml_error(text: str) -> str:
    with pytest.raises(UserError) as e:
        yamlio.load_with_lines(text, "p.yaml")
    return str(e.value)


def test_yaml_deep_nesting():
    assert _yaml_error("a: " + "[" * 1000 + "]" * 1000) == "p.yaml:1:67: invalid YAML: nesting deeper than 64 levels"


def test_yaml_recursive_anchor():
    assert _yaml_error("a: &x [1, *x]\n") == ("p.yaml:1:4: invalid YAML: an alias refers to the node that contains "
                                              "it (recursive anchor)")


def test_yaml_alias_bomb_is_refused_fast():
    bomb = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        bomb.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    msg = _yaml_error("\n".join(bomb) + "\n")
    assert "more than 200,000 nodes once aliases are expanded (an alias bomb" in msg


def test_yaml_huge_integer():
    assert _yaml_error("asn: " + "9" * 5000 + "\n") == "p.yaml:1:6: invalid YAML: integer with more than 30 digits"


def test_yaml_invalid_calendar_date():
    assert _yaml_error("expires: 2099-02-30\n") == ("p.yaml:1:10: invalid YAML: '2099-02-30' is not a valid date or "
                                                    "time (day is out of range for month)")


def test_yaml_duplicate_key():
    assert _yaml_error("allow: 1\nname: x\nallow: 2\n") == ("p.yaml:3:1: invalid YAML: duplicate key 'allow' "
                                                            "(first at line 1)")


def test_duplicate_allow_in_shipped_policy_fails_check(tmp_path, cli):
    pol = tmp_path / "gdpr.yaml"
    text = open("policies/gdpr-personal-data.yaml").read()
    pol.write_text(text + "allow:\n  jurisdictions: [US, CN]\n")
    r = cli("policy", "check", pol)
    n = text.count("\n") + 1
    first = text.splitlines().index("allow:") + 1
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{pol}:{n}:1: invalid YAML: duplicate key 'allow' (first at line {first})" in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "devzero", "folder"])
def test_policy_that_is_not_a_regular_file(tmp_path, cli, kind):
    d = tmp_path / "pols"
    d.mkdir()
    shutil.copy("policies/gdpr-personal-data.yaml", d)
    p = d / "z.yaml"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "devzero":
        os.symlink("/dev/zero", p)
    else:
        p.mkdir()
    r = cli("policy", "check", d, timeout=20)
    assert r.returncode == 2 and f"{p}: cannot read policy: not a regular file" in r.stderr, r.stderr


def test_oversized_policy_is_refused(tmp_path, cli):
    p = tmp_path / "big.yaml"
    with open(p, "w") as f:
        f.write("version: 1\nname: big\nhome: [EU]\nallow:\n  networks:\n")
        for i in range(300_000):
            f.write(f"  - 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n")
    r = cli("policy", "check", p)
    size = p.stat().st_size
    assert r.returncode == 2 and f"{p}: policy is {size:,} bytes, more than the limit of 4,194,304" in r.stderr


def test_asn_above_32_bits(tmp_path, cli):
    p = tmp_path / "asn.yaml"
    p.write_text("version: 1\nname: a\nhome: [EU]\nallow:\n  jurisdictions: [EEA]\ndeny:\n  asns: [AS9999999999]\n")
    r = cli("policy", "check", p)
    assert r.returncode == 2 and f"{p}:7: deny.asns[0]: 'AS9999999999' is not an AS number (0 to 4294967295)" \
        in r.stderr, r.stderr


def test_non_utf8_config(tmp_path, cli):
    c = tmp_path / "agent.yaml"
    c.write_bytes(b"listen: 127.0.0.1:9807\npolicies: /tmp/\xff\xfe\n")
    r = cli("run", "--config", c)
    assert r.returncode == 2 and f"{c}: not UTF-8 text (byte offset 38)" in r.stderr and "Traceback" not in r.stderr


def test_config_with_bad_date_and_bomb(tmp_path, cli):
    c = tmp_path / "agent.yaml"
    c.write_text("listen: &a [*a]\n")
    r = cli("run", "--config", c)
    assert r.returncode == 2 and "recursive anchor" in r.stderr and "Traceback" not in r.stderr


# -- captures ----------------------------------------------------------------------------------
@pytest.fixture
def walk(capture_walk):
    """Both capture walks (tests/conftest.py)."""
    return capture_walk


PKT = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="192.0.2.10", dst="203.0.113.9")
             / UDP(sport=5, dport=53))


def _short_block(btype: int, blen: int) -> bytes:
    body = b"\x00" * (blen - 12)
    return struct.pack("<II", btype, blen) + body + struct.pack("<I", blen)


@pytest.mark.parametrize("btype,blen", [(6, 24), (2, 28), (1, 16), (3, 12)])
def test_pcapng_last_block_shorter_than_its_fields(tmp_path, walk, btype, blen):
    p = write_pcapng(tmp_path / "s.pcapng", [(1, None)], [(0, 1.0, PKT)])
    good = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(_short_block(btype, blen))
    cap = read_capture(p)
    assert [(f.dst, f.packets) for f in cap.flows] == [("203.0.113.9", 1)]
    need = pcap_mod.PCAPNG_MIN[btype]
    assert cap.stats.warnings == [f"{p}: 1 block(s) of type {btype} shorter than their fixed fields ({need} bytes); "
                                  f"skipped (byte offset {good})"]


def test_warnings_are_aggregated_per_kind(tmp_path, walk):
    p = write_pcapng(tmp_path / "w.pcapng", [(1, None)], [(0, 1.0, PKT)])
    first = os.path.getsize(p)
    bad = struct.pack("<IIIII", 7, 0, 0, len(PKT), len(PKT)) + PKT  # interface 7 was never described
    bad += b"\x00" * (-len(bad) % 4)
    block = struct.pack("<II", 6, 12 + len(bad)) + bad + struct.pack("<I", 12 + len(bad))
    with open(p, "ab") as f:
        f.write(block * 20000)
    cap = read_capture(p)
    offs = ", ".join(str(first + i * len(block)) for i in range(5))
    assert cap.stats.malformed == 20000
    assert cap.stats.warnings == [f"{p}: 20,000 packet block(s) name an interface not described before them or "
                                  f"overrun their block; skipped (first at byte offsets {offs}, ...)"]


def test_unsupported_link_warning_is_one_line_on_both_paths(tmp_path, walk):
    n = pcap_mod.CHUNK + 1000  # more than one chunk: the paths see different chunk boundaries
    p = tmp_path / "u.pcap"
    with open(p, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 147))
        f.write((struct.pack("<IIII", 1, 0, 4, 4) + b"\x00" * 4) * n)
    cap = read_capture(str(p))
    assert cap.stats.unsupported == n
    assert cap.stats.warnings == [f"{p}: link type 147 is not supported; {n:,} packet(s) skipped"]


def test_capture_that_shrinks_while_read(tmp_path, walk, monkeypatch):
    """logrotate copytruncate: the file is cut while we read it. mmap died with SIGBUS here."""
    frames = [(1.0 + i, PKT) for i in range(2000)]
    p = write_pcap(tmp_path / "grow.pcap", frames)
    size = os.path.getsize(p)
    monkeypatch.setattr(pcap_mod, "SEGMENT", 4096)
    real = pcap_mod.Window.advance
    calls = []

    def advance(self, keep_from):
        calls.append(1)
        if len(calls) == 3:
            os.truncate(p, 10_000)  # cut while reading, in the middle of a record
        return real(self, keep_from)

    monkeypatch.setattr(pcap_mod.Window, "advance", advance)
    cap = read_capture(p)
    whole = (10_000 - 24) // (16 + len(PKT))
    assert cap.flows[0].packets == whole
    assert cap.stats.truncated
    assert f"{p}: the file shrank from {size:,} to 10,000 bytes while being read; audited what was read" \
        in cap.stats.warnings


def test_capture_shrinking_under_a_real_reader_has_no_sigbus(tmp_path, cli):
    """End to end: another process truncates the file while `audit` runs; exit 0/1, never a signal."""
    p = write_pcap(tmp_path / "big.pcap", [(1.0, PKT)] * 400_000)
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "agent", "audit", "--format", "json", p],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    os.truncate(p, 5000)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 1), err
    assert "Traceback" not in err


# -- --output: regular files atomically, anything else in place --------------------------------
def test_output_to_dev_null_keeps_the_device(tmp_path, cli):
    dev = tmp_path / "null"
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    r = cli("audit", "--format", "json", "--output", dev, "examples/demo.pcap")
    assert r.returncode == 1, r.stderr
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    r = cli("audit", "--format", "json", "--output", "/dev/null", "examples/demo.pcap")
    assert r.returncode == 1 and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_to_fifo_is_written_in_place(tmp_path, cli):
    import subprocess
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo).read()))
    t.start()
    r = subprocess.run([sys.executable, "-m", "agent", "audit", "--format", "json", "--output", str(fifo),
                        "examples/demo.pcap"], capture_output=True, text=True, timeout=60)
    t.join(10)
    assert r.returncode == 1 and stat.S_ISFIFO(os.stat(fifo).st_mode) and '"violations"' in got[0]


def test_output_dash_is_stdout(cli):
    r = cli("audit", "--format", "json", "--output", "-", "examples/demo.pcap")
    assert r.returncode == 1 and r.stdout.lstrip().startswith("{") and not os.path.exists("-")


def test_output_file_mode_and_no_predictable_temp(tmp_path, cli):
    out = tmp_path / "report.json"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    # The old writer used FILE.tmp<pid>; plant symlinks at every such name a child could get.
    for pid in range(os.getpid(), os.getpid() + 200):
        os.symlink(victim, f"{out}.tmp{pid}")
    r = cli("audit", "--format", "json", "--output", out, "examples/demo.pcap")
    assert r.returncode == 1
    assert victim.read_text() == "keep"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640 & ~_umask()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".report.json.")]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_crash_is_never_exit_1(monkeypatch, capsys):
    from agent import cli as cli_mod
    from agent.commands import audit

    def boom(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(audit, "run_audit", boom)
    assert cli_mod.main(["audit", "examples/demo.pcap"]) == cli_mod.EXIT_INTERNAL == 70
    assert "internal error" in capsys.readouterr().err
