import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sinks.eventlog import EvidenceLog, Options


def test_lines_are_whole_and_rotation_keeps_backups(tmp_path):
    path = tmp_path / "ev.jsonl"
    log = EvidenceLog(Options(str(path), max_bytes=4096, backups=2))
    for i in range(200):
        log.write({"i": i, "pad": "x" * 50})
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["ev.jsonl", "ev.jsonl.1", "ev.jsonl.2"]
    for f in files:
        raw = f.read_bytes()
        assert raw.endswith(b"\n") and len(raw) <= 4096
        [json.loads(line) for line in raw.splitlines()]
    last = [json.loads(x) for x in path.read_text().splitlines()]
    assert last[-1]["event"] == "stop" and last[-2]["i"] == 199
    assert [r["seq"] for r in last] == list(range(last[0]["seq"], last[-1]["seq"] + 1))


@pytest.mark.parametrize("per_batch", [13, 300])
def test_batches_rotate_like_single_lines_and_lose_nothing(tmp_path, monkeypatch, per_batch):
    """The daemon writes batches (`write_many`): a batch that would cross the size limit is cut
    where it crosses, so files stay under the limit, every record is in some file once, in order;
    and a batch is still a few writes, not one per line, across rotations."""
    path = tmp_path / "ev.jsonl"
    log = EvidenceLog(Options(str(path), max_bytes=4096, backups=20))
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: writes.append(len(b)) or real_write(fd, b))
    for start in range(0, 300, per_batch):
        batch = [log.body({"i": i, "pad": "x" * 50}) for i in range(start, min(300, start + per_batch))]
        written, lost = log.write_many(batch)
        assert lost == [] and written == min(300, start + per_batch) - start
    log.close()
    rotations = len(list(tmp_path.iterdir())) - 1
    assert rotations >= 5 and len(writes) <= len(range(0, 300, per_batch)) + 2 * rotations + 2
    files = sorted(tmp_path.iterdir(), key=lambda f: -int(f.suffix[1:]) if f.suffix[1:].isdigit() else 0)
    recs = []
    for f in files:
        raw = f.read_bytes()
        assert raw.endswith(b"\n") and len(raw) <= 4096
        recs += [json.loads(line) for line in raw.splitlines()]
    assert [r["i"] for r in recs if "i" in r] == list(range(300))
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


def test_reopening_after_a_cut_line_removes_it_and_names_it_in_the_gap(tmp_path):
    """A record cut inside a write (SIGKILL can end a multi-page write early) is cut back to the
    last whole record at start-up, and the gap record says where and how much was removed."""
    path = tmp_path / "ev.jsonl"
    path.write_bytes(b'{"a": 1}\n{"cut')
    log = EvidenceLog(Options(str(path)))
    log.write({"b": 2})
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"a": 1}'
    gap, b = json.loads(lines[1]), json.loads(lines[2])
    assert gap["event"] == "gap" and gap["reason"] == "unclean-stop" and gap["torn"] == {"offset": 9, "bytes": 5}
    assert b["b"] == 2 and b["seq"] == gap["seq"] + 1
    assert all(json.loads(x) for x in lines)


def test_a_torn_tail_after_a_clean_stop_is_still_cut_and_named(tmp_path):
    path = tmp_path / "ev.jsonl"
    log = EvidenceLog(Options(str(path)))
    log.write({"a": 1})
    log.close()  # a `stop` record
    with open(path, "ab") as f:
        f.write(b'{"time":"2026-01-01T00:00:00Z","event":"new","po')
    EvidenceLog(Options(str(path))).close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r.get("event") for r in recs] == [None, "stop", "gap", "stop"] and recs[2]["torn"]["bytes"] == 48


def test_audit_skips_a_torn_record_and_reports_seq_holes(tmp_path):
    """What `audit` reads of an evidence log: a torn line (from an older agent, or a copy) is
    skipped with a warning, not a refusal of the whole file; a hole in seq without a gap record is a
    warning; both readers agree."""
    from agent.sources.flowlog.jsonl import read_jsonl
    from agent.sources.flowlog.table import read_jsonl_table

    flow = {"proto": "tcp", "src": "10.0.0.1", "sport": 4000, "dst": "203.0.113.9", "dport": 443, "packets": 1,
            "bytes": 60, "first_seen": "2026-01-01T00:00:00Z"}
    rec = lambda seq, port: json.dumps({"time": "2026-01-01T00:00:01Z", "event": "new", "policy": "p",  # noqa: E731
                                        "verdict": "violation", "flow": {**flow, "sport": port}, "seq": seq})
    path = tmp_path / "ev.jsonl"
    path.write_text(rec(1, 4001) + "\n" + rec(2, 4002)[:50] + "\n" + rec(2, 4003) + "\n" + rec(7, 4004) + "\n")
    flows, stats = read_jsonl(str(path))
    assert sorted(f.sport for f in flows) == [4001, 4003, 4004]
    assert any("ev.jsonl:2: a torn evidence record" in w for w in stats.warnings)
    assert any("ev.jsonl:4: evidence seq jumps from 2 to 7: 4 record(s) missing" in w for w in stats.warnings)
    assert (stats.torn, stats.seq_holes) == (1, 4)
    assert read_jsonl_table(str(path)) is None  # not plain: the line reader above reads it
    whole = tmp_path / "whole.jsonl"
    whole.write_text(rec(1, 4001) + "\n" + rec(5, 4002) + "\n")
    assert read_jsonl_table(str(whole)) is None and read_jsonl(str(whole))[1].seq_holes == 3
    plain = tmp_path / "flows.jsonl"
    plain.write_text(json.dumps(flow) + "\n" + '{"proto": "tcp", "src"\n')
    import pytest as _pytest

    from agent.errors import UserError
    with _pytest.raises(UserError, match="flows.jsonl:2: not valid JSON"):
        read_jsonl(str(plain))  # a flow log (not evidence) with a broken line is still refused


def test_evidence_replay_counts_each_flow_once(tmp_path):
    from agent.sources.flowlog.jsonl import read_jsonl

    flow = {"proto": "tcp", "src": "192.0.2.1", "sport": 5, "dst": "203.0.113.9", "dport": 443,
            "first_seen": "2026-01-01T00:00:00Z"}
    lines = [{"event": "new", "conntrack_id": 7, "verdict": "violation", "policy": "a", "flow": {**flow, "bytes": 0}},
             {"event": "new", "conntrack_id": 7, "verdict": "indeterminate", "policy": "b",
              "flow": {**flow, "bytes": 0}},
             {"event": "end", "conntrack_id": 7, "verdict": "violation", "policy": "a", "flow": {**flow, "bytes": 900}}]
    p = tmp_path / "ev.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    flows, _ = read_jsonl(str(p))
    assert len(flows) == 1 and flows[0].bytes == 900
    os.unlink(p)


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_clean_stop_then_start_has_no_gap_and_seq_continues(tmp_path):
    path = tmp_path / "ev.jsonl"
    log = EvidenceLog(Options(str(path)))
    log.write({"x": 1})
    log.close()
    log = EvidenceLog(Options(str(path)))
    log.write({"x": 2})
    log.close()
    recs = records(path)
    assert [r.get("event") for r in recs] == [None, "stop", None, "stop"]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]


def test_kill_leaves_a_gap_record_naming_the_previous_run(tmp_path):
    path = tmp_path / "ev.jsonl"
    log = EvidenceLog(Options(str(path)))
    log.write({"x": 1})
    os.close(log._fd)  # as a kill -9 would leave it: no stop record
    log2 = EvidenceLog(Options(str(path)))
    log2.close()
    gap = records(path)[1]
    assert gap["event"] == "gap" and gap["reason"] == "unclean-stop" and gap["previous_seq"] == 1
    assert gap["from"] == records(path)[0]["time"]


def test_a_symlink_at_the_path_is_refused(tmp_path):
    import pytest

    from agent.errors import UserError

    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "ev.jsonl").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        EvidenceLog(Options(str(tmp_path / "ev.jsonl")))
    assert target.read_text() == ""


@pytest.mark.parametrize("batch", [1, 30])
def test_failed_rotation_keeps_writing_and_closes_only_its_own_fd(tmp_path, batch):
    """One by one, or in batches (`write_many`: a batch that cannot rotate is written line by line)."""
    path = tmp_path / "ev.jsonl"
    (tmp_path / "ev.jsonl.1").mkdir()  # a directory in the way: the rename fails
    (tmp_path / "ev.jsonl.1" / "x").write_text("")
    log = EvidenceLog(Options(str(path), max_bytes=4096, backups=1))
    sentinel = os.open(os.devnull, os.O_RDONLY)  # a number someone else owns
    for start in range(0, 200, batch):
        bodies = [log.body({"i": i, "pad": "x" * 50}) for i in range(start, min(200, start + batch))]
        assert log.write_many(bodies) == (len(bodies), [])
    os.fstat(sentinel)  # still open: the log never closed a descriptor it does not own
    os.close(sentinel)
    log.close()
    recs = records(path)
    assert [r["i"] for r in recs if "i" in r] == list(range(200))  # nothing lost, all in the current file
    assert log.lost_lines == 0


def test_rotation_succeeds_once_the_obstacle_is_gone(tmp_path):
    import shutil

    path = tmp_path / "ev.jsonl"
    (tmp_path / "ev.jsonl.1").mkdir()
    (tmp_path / "ev.jsonl.1" / "x").write_text("")
    t = [1000.0]
    log = EvidenceLog(Options(str(path), max_bytes=4096, backups=1), clock=lambda: t[0])
    for i in range(100):
        log.write({"i": i, "pad": "x" * 50})
    shutil.rmtree(tmp_path / "ev.jsonl.1")
    t[0] += 10  # past the retry delay
    for i in range(100, 130):
        log.write({"i": i, "pad": "x" * 50})
    log.close()
    got = records(tmp_path / "ev.jsonl.1") + records(path)
    assert [r["i"] for r in got if "i" in r] == list(range(130))
    assert path.stat().st_size <= 4096 and oct(path.stat().st_mode & 0o777) == oct(0o640 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


DISK_FULL = """
import json, os, resource, signal, sys
from agent.sinks.eventlog import EvidenceLog, Options
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
path = sys.argv[1]
log = EvidenceLog(Options(path))
lost = 0
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
if sys.argv[2] == "one":
    for i in range(100):
        try:
            log.write({"i": i, "pad": "x" * 40})
        except OSError:
            lost += 1
else:  # batches of 7 records, as the daemon writes them
    for start in range(0, 100, 7):
        bodies = [log.body({"i": i, "pad": "x" * 40}) for i in range(start, min(100, start + 7))]
        written, errors = log.write_many(bodies)
        lost += len(errors)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.write({"i": "after"})
log.close()
print(json.dumps({"lost": lost, "counted": log.lost_lines}))
"""


@pytest.mark.parametrize("mode", ["one", "many"])
def test_disk_full_writes_no_partial_line_counts_and_marks_the_gap(tmp_path, mode):
    """A file-size limit stands in for a full disk: the write past it is short, then fails. Records
    written one by one or in batches (one write each) leave the same whole lines."""
    import subprocess
    import sys

    from tests.conftest import REPO

    path = tmp_path / "ev.jsonl"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(path), mode], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lost"] > 0 and out["lost"] == out["counted"]
    raw = path.read_bytes()
    recs = [json.loads(x) for x in raw.splitlines()]  # every line parses: nothing torn or glued
    written = [r["i"] for r in recs if "i" in r and r["i"] != "after"]
    gap = next(r for r in recs if r.get("event") == "gap")
    assert gap["lost_lines"] == out["lost"] == 100 - len(written)
    assert recs[-2]["i"] == "after" and recs.index(gap) == len(recs) - 3
    assert [r["seq"] for r in recs] == sorted({r["seq"] for r in recs})
    assert written == list(range(len(written))) and len(written) == 29  # as many as fit in 3,000 bytes


def test_records_with_shared_parts_equal_records_made_whole(tmp_path):
    """record() makes the verdict and location parts once per (verdict, location without address);
    every record must still be exactly the one made from scratch, for locations that differ only in
    fields outside the verdict's key too (anycast, EU flag, embedded IPv4)."""
    from datetime import date
    from types import SimpleNamespace

    import orjson

    from agent.enrich.geoip import Locator
    from agent.enrich.scope import Scoper
    from agent.judge.pipeline import Judged, Pipeline
    from agent.policy.jurisdictions import Jurisdictions
    from agent.policy.load import load_policies
    from agent.sinks import eventlog
    from tests.helpers import build_asn_mmdb, build_city_mmdb
    from tests.test_bulk import LOCATIONS, random_flows

    def whole(judged, verdict, event, extra):  # the record as made before parts were shared
        f, loc = judged.flow, judged.location
        rec = {"time": "T", "event": event, "direction": "inbound" if judged.inbound else "outbound",
               **verdict.to_json(), "message": judged.message(verdict),
               "flow": f.to_json(), "country": loc.country if loc.unknown_reason is None else None,
               "jurisdictions": list(judged.jurisdictions),
               "location": {k: v for k, v in loc.to_json().items() if k not in ("ip",)},
               "asn": loc.asn, "as_org": loc.as_org}
        r = judged.recipient
        if r is not None:
            rec["recipient"] = {"id": r.id, "name": r.name, "role": r.role, "established_in": r.established_in,
                                "processing_locations": list(r.processing_locations)}
        rec.update(extra)
        return rec

    locations = dict(LOCATIONS, **{"198.51.100.192/27": {"country": "DE", "anycast": True}})
    dbs = [build_city_mmdb(tmp_path / "c.mmdb", locations), build_asn_mmdb(tmp_path / "a.mmdb", locations)]
    repo = Path(__file__).resolve().parents[2]
    jur = Jurisdictions.load()
    scoper = Scoper(public_nets=["198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"])
    pipe = Pipeline(load_policies(repo / "policies", jur), jur, Locator(dbs, scoper), scoper, as_of=date(2025, 7, 1))
    eventlog._PARTS.clear()
    checked = 0
    recipient = SimpleNamespace(id="crm", name="CRM \"SaaS\" Ltd", role="processor", established_in="IE",
                                processing_locations=("IE", "US"))
    extras = [{"conntrack_id": 7}, {}, {"conntrack_id": 8, "nat": {"dst": "203.0.113.10", "src": None}}]
    for i, f in enumerate(random_flows(1500, 44)):
        if not pipe.is_egress(f):
            continue
        j = pipe.judge(f)
        if i % 5 == 0:
            j = Judged(j.flow, j.location, j.outcomes, j.jurisdictions, recipient=recipient)
        extra = extras[i % 3]
        for v in j.outcomes:
            for _ in range(2):  # made, then taken from the shared parts
                got = eventlog.record(j, v, "new", extra)
                got["time"] = "T"
                want = whole(j, v, "new", extra)
                assert got == want
                assert list(got) == list(want)  # and the same key order
                # serialised from parts: byte for byte what serialising the whole record gives
                body = eventlog.record_body(j, v, "new", eventlog.extra_members(extra),
                                            orjson.dumps(j.flow.to_json()), orjson.dumps("T"))
                assert body + b"}" == orjson.dumps(want)
                checked += 1
    assert checked > 1000


@settings(max_examples=300, deadline=None)
@given(bodies=st.lists(st.binary(max_size=40).map(lambda b: b'{"x":"' + b.hex().encode() + b'"'), max_size=12),
       i=st.integers(0, 14), seq=st.integers(0, 10**15), room=st.integers(-5, 900))
def test_numbered_lines_in_c_equal_python(bodies, i, seq, room):
    """The evidence log's batch of lines (`numbered_lines`, C where built) is the Python listing's,
    byte for byte, however many of them fit."""
    from agent.sinks import eventlog

    want = eventlog.py_numbered_lines(bodies, i, seq, room)
    assert eventlog.numbered_lines(bodies, i, seq, room) == want
    assert want[0] == b"".join(b + b',"seq":%d}\n' % (seq + 1 + k) for k, b in enumerate(bodies[i:i + want[1]]))
