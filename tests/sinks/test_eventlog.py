import json
import os

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
    assert json.loads(path.read_text().splitlines()[-1])["i"] == 199


def test_reopening_after_a_cut_line_starts_on_a_new_line(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_bytes(b'{"a": 1}\n{"cut')
    log = EvidenceLog(Options(str(path)))
    log.write({"b": 2})
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"a": 1}' and json.loads(lines[-1]) == {"b": 2}


def test_evidence_replay_counts_each_flow_once(tmp_path):
    from agent.sources.jsonl import read_jsonl

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
